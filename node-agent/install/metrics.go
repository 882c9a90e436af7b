package install

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	installed prometheus.Gauge
	reasserts prometheus.Counter
	fights    prometheus.Counter
	errors    prometheus.Counter
	after     prometheus.Gauge
	watching  prometheus.Gauge
}

func newMetrics(r prometheus.Registerer) *metrics {
	m := &metrics{
		installed: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ambit_installer_installed",
			Help: "1 when ambit-cni is the last plugin of the node's primary CNI config, 0 otherwise.",
		}),
		reasserts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_installer_reasserts_total",
			Help: "Times the installer put its entry back after another writer rewrote the primary CNI config without it.",
		}),
		fights: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_installer_config_fights_total",
			Help: "Times the re-assertions crossed the fight threshold: another writer keeps removing our entry.",
		}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_installer_errors_total",
			Help: "Failed installer reconciliations (each is retried).",
		}),
		after: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ambit_installer_plugins_after",
			Help: "Plugin configs in the primary network's libcni drop-in directory, which a runtime built with containernetworking/cni v1.3.0 or later runs after ambit-cni (0 when ambit-cni runs last, and while it is not chained: see ambit_installer_installed).",
		}),
		watching: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ambit_installer_watching",
			Help: "1 while the installer watches the CNI directories, 0 while it cannot (inotify limits reached) and polls them every second instead.",
		}),
	}
	if r == nil {
		return m
	}
	m.installed = register(r, m.installed)
	m.reasserts = register(r, m.reasserts)
	m.fights = register(r, m.fights)
	m.errors = register(r, m.errors)
	m.after = register(r, m.after)
	m.watching = register(r, m.watching)
	return m
}

// register returns the collector already registered under the same name
// when there is one, so a restarted installer keeps counting.
func register[C prometheus.Collector](r prometheus.Registerer, c C) C {
	if err := r.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
	}
	return c
}
