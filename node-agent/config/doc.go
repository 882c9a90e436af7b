// Package config is the node agent's configuration: one file (YAML or
// JSON, e.g. /etc/ambit/config.yaml) whose every field has a default, so an
// empty file — or none — gives a working agent. Command-line flags may
// override single fields. Validation names the offending field so an
// operator can fix it without reading code. Every field is documented in
// node-agent/README.md.
package config
