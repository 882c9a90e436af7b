// Command image assembles Ambit's container image without Docker or a
// registry: one layer holding /usr/local/bin/ambit-agent,
// /usr/local/bin/ambit-cni (the installer copies it to the host), the CA
// certificate bundle, a minimal /etc/passwd, and /tmp; entrypoint
// ambit-agent. The result is a `docker save`-format tarball, which
// `ctr -n k8s.io images import`, `podman load`, `docker load` and
// `kind load image-archive` all accept.
//
// The build is reproducible: file times and the image's creation time come
// from SOURCE_DATE_EPOCH (default 0), entries are in a fixed order, so the
// same binaries give the same image digest.
//
//	go run ./hack/image -agent bin/ambit-agent -cni bin/ambit-cni \
//	    -tag docker.io/ambit-mesh/ambit:dev -o bin/ambit-image.tar
//
// `make image` runs exactly that after `make build`.
package main
