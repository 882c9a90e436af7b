// Package install puts ambit-cni on a node and takes it off again. It runs
// inside the ambit-agent DaemonSet pod as `ambit-agent install` (a mode of
// the agent, started after the agent serves its socket) and
// `ambit-agent uninstall`.
//
// Install (Run):
//   - copies ambit-cni into the host's CNI bin directory atomically
//     (temporary file in the same directory, fsync, rename), so a runtime
//     exec'ing the plugin never sees a partial binary — also during an
//     upgrade, when the binary is replaced under running pods;
//   - waits for Config.Ready, then finds the primary CNI config the way the
//     runtime does (lexically first valid .conflist/.conf/.json), converts
//     a single-plugin .conf to a .conflist (keeping the original under
//     net.d/.ambit/ for uninstall, and removing it so it stops being
//     picked), and chains our entry last — a textual splice that keeps
//     every other byte, the file's mode and owner. When the network has
//     plugin drop-ins (<conf dir>/<name>/*.conf, which libcni v1.3.0+ runs
//     after the list's own plugins) ambit-cni stays chained, before them,
//     with a warning and the ambit_installer_plugins_after gauge (a pod
//     must never start unredirected); a converted .conf says
//     loadOnlyInlinedPlugins, as a .conf never loaded them; a list whose
//     plugins all come from there is refused;
//   - watches both directories (fsnotify, plus a periodic resync) and
//     re-asserts when the primary CNI rewrites its file or someone deletes
//     the binary; counts every re-assertion and warns (log and the
//     ambit_installer_config_fights_total metric) when another writer keeps
//     removing our entry.
//
// Uninstall removes the entry from every config file (restoring a
// converted .conf byte for byte), then the binary, then — opt-in, through
// Config.UnenrollAll which the agent provides — the redirection in every
// enrolled running pod.
//
// Wiring in ambit-agent's main (the agent owns its flags and readiness):
//
//	var cfg install.Config // defaults match manifests/ (/host/opt/cni/bin, /host/etc/cni/net.d)
//	// The plugin must agree with the agent: same socket, snapshot and exclusions.
//	cfg.Entry.AgentSocket = agentCfg.Socket
//	cfg.Entry.SnapshotFile = agentCfg.SnapshotFile
//	cfg.Entry.ExcludedNamespaces = agentCfg.ExcludedNamespaces
//	ready := make(chan struct{})
//	cfg.Ready = ready                  // close(ready) once the CNI socket serves
//	cfg.OnState = func(ok bool, _ string) { installed.Store(ok) } // for /readyz
//	cfg.Registerer = prometheus.DefaultRegisterer
//	go func() { errc <- install.Run(ctx, cfg) }()
//
//	// ambit-agent uninstall [--unenroll-all]:
//	if unenrollAll {
//		cfg.UnenrollAll = agent.UnenrollAll
//	}
//	err := install.Uninstall(ctx, cfg)
package install
