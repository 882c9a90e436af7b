package agent

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	enrolled     prometheus.Gauge
	latency      *prometheus.HistogramVec
	failures     *prometheus.CounterVec
	requests     *prometheus.CounterVec
	repairs      prometheus.Counter
	ruleCheck    prometheus.Histogram
	adopted      prometheus.Counter
	adoptSeconds prometheus.Gauge
	reloadErrors prometheus.Counter
	keeperErrors *prometheus.CounterVec
	sysctlErrors prometheus.Counter
	// socketTakeovers: the plugin socket's path taken back (socket.go).
	socketTakeovers *prometheus.CounterVec
	// drainGuardFailures reads the process's count (drainguard.go);
	// orphanGuards: guards of a dead agent's drain removed.
	drainGuardFailures prometheus.CounterFunc
	orphanGuards       prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		enrolled: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ambit_agent_enrolled_pods", Help: "Pods currently enrolled and served by this agent.",
		}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "ambit_agent_enrollment_duration_seconds",
			Help:    "Time to enroll one pod (decision, certificate, listeners, tunnel), by path: add (CNI ADD), live (label change), adopt (restart).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"path"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_agent_enrollment_failures_total", Help: "Enrollments that failed, by reason.",
		}, []string{"reason"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_agent_plugin_requests_total", Help: "Plugin requests, by op and result (enroll, skip, error, malformed).",
		}, []string{"op", "result"}),
		repairs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_agent_redirect_repairs_total", Help: "In-pod redirections found missing or different and reinstalled.",
		}),
		ruleCheck: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "ambit_agent_rule_check_duration_seconds",
			Help:    "Wall time of one pass verifying every enrolled pod's in-pod redirection (after re-adoption, then each ruleCheckInterval); the count is the number of passes.",
			Buckets: []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}),
		adopted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_agent_adopted_pods_total", Help: "Enrolled pods re-adopted after an agent start.",
		}),
		adoptSeconds: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ambit_agent_adoption_seconds", Help: "How long re-adopting the enrolled pods took at the last start.",
		}),
		reloadErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_agent_inventory_reload_errors_total", Help: "Inventory reloads rejected (the last good inventory stays in force).",
		}),
		keeperErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_agent_keeper_errors_total", Help: "Failed calls to the keeper (node-agent/keeper), by op (put, drop, prune, count): a pod whose put failed loses its listeners if this agent crashes.",
		}, []string{"op"}),
		sysctlErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_agent_pod_sysctl_errors_total", Help: "Pods whose net.ipv4.tcp_migrate_req could not be set: their queued connections are reset, not handed over, when an agent stops or crashes.",
		}),
		socketTakeovers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_agent_plugin_socket_takeovers_total", Help: "Times this agent took the plugin socket's path back from a newer agent that stopped or died (a rollback during a surge), by result (ok, error).",
		}, []string{"result"}),
		drainGuardFailures: prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "ambit_agent_drain_guard_failures_total", Help: "Live unenrollments whose drain guard could not be added: the pod's established connections were cut, not drained.",
		}, func() float64 { return float64(drainGuardFailures.Load()) }),
		orphanGuards: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_agent_drain_guard_orphans_removed_total", Help: "Drain guards left in pods by an agent that stopped or died mid-drain, removed by this one once no other agent ran on the node.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.enrolled, m.latency, m.failures, m.requests, m.repairs, m.ruleCheck, m.adopted, m.adoptSeconds, m.reloadErrors, m.keeperErrors, m.sysctlErrors, m.socketTakeovers, m.drainGuardFailures, m.orphanGuards)
	}
	return m
}
