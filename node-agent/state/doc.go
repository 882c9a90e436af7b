// Package state is what the agent persists under its state directory
// (default /var/run/ambit) so a restarted agent — after an upgrade or a
// kill -9 — can find and re-adopt every enrolled pod: one small JSON file
// per pod sandbox under pods/, written atomically (temp file, fsync,
// rename), named by a hash of the container ID so any ID is a safe file
// name.
//
// /var/run is a tmpfs: a node reboot forgets everything, which is right,
// because every sandbox is recreated (and re-enrolled through CNI ADD)
// after a reboot.
package state
