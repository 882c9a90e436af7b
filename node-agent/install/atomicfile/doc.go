// Package atomicfile replaces files so that a reader — the container
// runtime loading a CNI config, or exec'ing a CNI plugin — sees either the
// complete old content or the complete new content, never a torn mix.
//
// A write goes to a temporary file in the same directory (same filesystem,
// so rename is atomic), is fsynced, gets the mode and owner the caller asks
// for, and is renamed over the target; the directory is fsynced so the
// rename survives a crash. Temporary names end in ".ambit-tmp-<random>",
// which no runtime loads (runtimes pick .conf, .conflist and .json).
package atomicfile
