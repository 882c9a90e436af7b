// Package conflist edits CNI network configuration files the way a guest
// should: it adds, replaces or removes exactly one plugin entry (ours) and
// leaves every other byte of the file as it was — other plugins' fields,
// their key order, whitespace and comments-free formatting alike.
//
// Edits are textual splices at offsets found with encoding/json's streaming
// decoder, not a decode/re-encode round trip, which would reorder keys,
// reformat numbers and drop duplicate keys. Because inserting appends
// ",<whitespace><entry>" after the last plugin and removing cuts exactly
// the span from the end of the previous plugin to the end of ours, removal
// is the byte-exact inverse of insertion.
//
// It also knows how runtimes choose the file they use (Primary): the
// lexically first file in the directory ending in .conf, .conflist or
// .json that parses as a valid configuration, as libcni's ConfFiles,
// containerd and CRI-O do. A single-plugin .conf/.json is converted to a
// .conflist (Convert) because only a list can chain a second plugin.
package conflist
