package ca

import (
	"bytes"
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Keys of the CA Secret. The native layout is ca.crt (signing certificate,
// optionally followed by intermediates), ca.key and optionally
// root-cert.pem (the trust bundle: the root above an intermediate, or old
// and new roots side by side during a root rotation). A cert-manager
// Certificate's Secret (tls.crt, tls.key, ca.crt) is accepted as well: then
// tls.crt/tls.key sign and ca.crt is the trust bundle.
const (
	SecretCertKey  = "ca.crt"
	SecretKeyKey   = "ca.key"
	SecretRootsKey = "root-cert.pem"
	// RootsConfigMapKey is the key of the published trust bundle.
	RootsConfigMapKey = "root-cert.pem"
)

// MaterialFromSecret parses the CA material of a Secret.
func MaterialFromSecret(s *corev1.Secret) (*Material, error) {
	d := s.Data
	if len(d[corev1.TLSPrivateKeyKey]) > 0 {
		m, err := ParseMaterial(d[corev1.TLSCertKey], d[corev1.TLSPrivateKeyKey], d[SecretCertKey])
		if err != nil {
			return nil, fmt.Errorf("secret %s/%s (cert-manager layout): %w", s.Namespace, s.Name, err)
		}
		return m, nil
	}
	m, err := ParseMaterial(d[SecretCertKey], d[SecretKeyKey], d[SecretRootsKey])
	if err != nil {
		return nil, fmt.Errorf("secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	return m, nil
}

// LoadOrCreateSecret reads the CA Secret, or generates a root and creates
// the Secret when it does not exist. Two replicas starting together both
// try to create; the loser gets AlreadyExists and reads the winner's, so
// both sign with one key. The returned bool is true when this call created it.
func LoadOrCreateSecret(ctx context.Context, c kubernetes.Interface, namespace, name, trustDomain string) (*Material, bool, error) {
	s, err := c.CoreV1().Secrets(namespace).Get(ctx, name, metav1.GetOptions{})
	if err == nil {
		m, err := MaterialFromSecret(s)
		return m, false, err
	}
	if !apierrors.IsNotFound(err) {
		return nil, false, fmt.Errorf("reading secret %s/%s: %w", namespace, name, err)
	}
	m, err := GenerateRoot(trustDomain, RootValidity)
	if err != nil {
		return nil, false, err
	}
	certPEM, keyPEM, _, err := m.PEM()
	if err != nil {
		return nil, false, err
	}
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name,
			Labels: map[string]string{"app.kubernetes.io/part-of": "ambit", "app.kubernetes.io/component": "ca"}},
		Type: corev1.SecretTypeOpaque,
		Data: map[string][]byte{SecretCertKey: certPEM, SecretKeyKey: keyPEM},
	}
	_, err = c.CoreV1().Secrets(namespace).Create(ctx, sec, metav1.CreateOptions{})
	if err == nil {
		return m, true, nil
	}
	if !apierrors.IsAlreadyExists(err) {
		return nil, false, fmt.Errorf("creating secret %s/%s: %w", namespace, name, err)
	}
	s, err = c.CoreV1().Secrets(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, false, fmt.Errorf("re-reading secret %s/%s after losing the create race: %w", namespace, name, err)
	}
	m, err = MaterialFromSecret(s)
	return m, false, err
}

// PublishRoots writes the trust bundle into a ConfigMap (created if
// absent, updated when different) that agents mount to trust the CA's
// serving certificate before their first request.
func PublishRoots(ctx context.Context, c kubernetes.Interface, namespace, name string, rootsPEM []byte) error {
	cms := c.CoreV1().ConfigMaps(namespace)
	cm, err := cms.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name,
				Labels: map[string]string{"app.kubernetes.io/part-of": "ambit", "app.kubernetes.io/component": "ca"}},
			Data: map[string]string{RootsConfigMapKey: string(rootsPEM)},
		}, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return PublishRoots(ctx, c, namespace, name, rootsPEM)
		}
		return err
	}
	if err != nil {
		return err
	}
	if bytes.Equal([]byte(cm.Data[RootsConfigMapKey]), rootsPEM) {
		return nil
	}
	cm = cm.DeepCopy()
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	cm.Data[RootsConfigMapKey] = string(rootsPEM)
	_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
	return err
}
