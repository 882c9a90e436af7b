package manifests

import (
	"path/filepath"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Where client-go's rest.InClusterConfig reads the API credentials.
const apiTokenDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// The API server's own token would reach every container of the pod and,
// at 3607 s (what the ServiceAccount admission plugin asks for), be
// extended to a year by --service-account-extend-token-expiration. So the
// pods that need the API project it by hand, short-lived, into the
// container that talks to the API, and nowhere else.
func TestAPITokenOnlyWhereUsed(t *testing.T) {
	for _, dir := range []string{".", "overlays/kind", "overlays/uninstall"} {
		t.Run(dir, func(t *testing.T) {
			r := render(t, filepath.Join(root(t), dir))
			ds := get[*appsv1.DaemonSet](t, r, "DaemonSet", ns, "ambit-agent")
			checkAPIToken(t, "agent", ds.Spec.Template.Spec, "agent")
			ca := get[*appsv1.Deployment](t, r, "Deployment", ns, "ambit-ca")
			checkAPIToken(t, "CA", ca.Spec.Template.Spec, "ca")
		})
	}
}

func checkAPIToken(t *testing.T, what string, s corev1.PodSpec, user string) {
	t.Helper()
	if s.AutomountServiceAccountToken == nil || *s.AutomountServiceAccountToken {
		t.Errorf("%s pod: the API server would mount its own token into every container (automountServiceAccountToken %v)", what, s.AutomountServiceAccountToken)
	}
	vols := map[string]corev1.Volume{}
	for _, v := range s.Volumes {
		vols[v.Name] = v
	}
	for _, c := range append(append([]corev1.Container(nil), s.InitContainers...), s.Containers...) {
		var api *corev1.VolumeMount
		for i, m := range c.VolumeMounts {
			if m.MountPath == apiTokenDir {
				api = &c.VolumeMounts[i]
			}
			// The ambit-ca audience token is for the CA only; any other
			// service account token is one the API server accepts.
			if p := vols[m.Name].Projected; p != nil && m.MountPath != apiTokenDir {
				for _, src := range p.Sources {
					if st := src.ServiceAccountToken; st != nil && st.Audience == "" {
						t.Errorf("%s container %s: API token in volume %s at %s", what, c.Name, m.Name, m.MountPath)
					}
				}
			}
		}
		if c.Name != user {
			if api != nil {
				t.Errorf("%s container %s does not use the API but mounts a token at %s", what, c.Name, apiTokenDir)
			}
			continue
		}
		if api == nil {
			t.Errorf("%s container %s talks to the API but has nothing at %s", what, c.Name, apiTokenDir)
			continue
		}
		if !api.ReadOnly {
			t.Errorf("%s container %s: %s is writable", what, c.Name, apiTokenDir)
		}
		p := vols[api.Name].Projected
		if p == nil {
			t.Errorf("%s: volume %s at %s is not projected", what, api.Name, apiTokenDir)
			continue
		}
		files := map[string]bool{}
		for _, src := range p.Sources {
			switch {
			case src.ServiceAccountToken != nil:
				st := src.ServiceAccountToken
				files[st.Path] = true
				if st.Audience != "" {
					t.Errorf("%s: API token audience %q, want the API server's", what, st.Audience)
				}
				// 3607 is the value the API server extends to a year.
				if e := st.ExpirationSeconds; e == nil || *e > 3600 || *e < 600 {
					t.Errorf("%s: API token expirationSeconds %v, want 600..3600", what, e)
				}
			case src.ConfigMap != nil && src.ConfigMap.Name == "kube-root-ca.crt":
				for _, it := range src.ConfigMap.Items {
					if it.Key == "ca.crt" {
						files[it.Path] = true
					}
				}
			case src.DownwardAPI != nil:
				for _, it := range src.DownwardAPI.Items {
					if it.FieldRef != nil && it.FieldRef.FieldPath == "metadata.namespace" {
						files[it.Path] = true
					}
				}
			}
		}
		for _, f := range []string{"token", "ca.crt", "namespace"} {
			if !files[f] {
				t.Errorf("%s: %s/%s missing (rest.InClusterConfig and kubectl read it)", what, apiTokenDir, f)
			}
		}
	}
}

// The CA's budget must not hold a node drain forever: not with fewer
// replicas than it wants available, nor while the CA pods are unready
// (the default policy evicts an unready pod only while the budget holds,
// so two crash-looping CA pods would block both their nodes' drains).
func TestCAPodDisruptionBudgetLetsDrainsThrough(t *testing.T) {
	for _, dir := range []string{".", "overlays/kind", "overlays/uninstall"} {
		t.Run(dir, func(t *testing.T) {
			r := render(t, filepath.Join(root(t), dir))
			pdb := get[*policyv1.PodDisruptionBudget](t, r, "PodDisruptionBudget", ns, "ambit-ca")
			d := get[*appsv1.Deployment](t, r, "Deployment", ns, "ambit-ca")
			if p := pdb.Spec.UnhealthyPodEvictionPolicy; p == nil || *p != policyv1.AlwaysAllow {
				t.Errorf("unhealthyPodEvictionPolicy %v, want AlwaysAllow", p)
			}
			// An integer minAvailable (a percentage would need rounding
			// rules this test does not repeat).
			if m := pdb.Spec.MinAvailable; pdb.Spec.MaxUnavailable != nil || m == nil || m.Type != intstr.Int ||
				d.Spec.Replicas == nil || m.IntValue() >= int(*d.Spec.Replicas) {
				t.Errorf("minAvailable %v with %v replicas: a drain could never evict a CA pod", pdb.Spec.MinAvailable, d.Spec.Replicas)
			}
		})
	}
}
