// Package health serves the agent's operational endpoints on the host
// network: /healthz (the process is alive and its loops turn), /readyz
// (ready only once the agent has adopted its snapshot of enrolled pods and
// serves the plugin socket) and /metrics (Prometheus).
package health
