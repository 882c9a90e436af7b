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
//
// With -platforms it builds one image per platform and an OCI image index
// over them (mixed amd64 + arm64 clusters: each node's runtime takes its
// own platform from one reference), written as an OCI layout archive and,
// with -push REF, pushed to a registry:
//
//	go run ./hack/image -platforms "linux/amd64 linux/arm64" \
//	    -agent 'bin/{platform}/ambit-agent' -cni 'bin/{platform}/ambit-cni' \
//	    -tag docker.io/ambit-mesh/ambit:dev -o bin/ambit-image-multiarch.tar
//
// `make image-multiarch` cross-compiles into bin/linux_amd64/,
// bin/linux_arm64/ and runs that. Each binary's ELF header must name its
// platform's architecture: a mislabelled one would only fail on the node.
package main
