package istio

import (
	"log/slog"
	"os"

	"github.com/ambit-mesh/ambit/tunnel"
)

func quietConfig() tunnel.Config {
	return tunnel.Config{Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}
}
