package redirect

import (
	"context"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
)

// A spec whose markMask is all 32 bits (Validate accepts it) verifies
// on every backend as installed. iptables-save prints a mark match with
// a full mask as "--mark 0x539", without "/0xffffffff", and the
// iptables backends compared that with "--mark 0x539/0xffffffff": every
// CHECK and periodic check found all rules "differing" right after the
// install, while nftables verified the same spec.
func TestFullMarkMaskVerifiesOnEveryBackend(t *testing.T) {
	testenv.RequireRoot(t)
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			n := nstest.New(t, "rd")
			spec := DefaultSpec()
			spec.MarkMask = 0xffffffff
			if _, err := Install(context.Background(), n, b, spec); err != nil {
				t.Fatal(err)
			}
			if err := Verify(context.Background(), n, spec); err != nil {
				t.Fatalf("Verify after Install: %v", err)
			}
			// The rules still compare: another mark is a difference.
			other := spec
			other.Mark = 0x53a
			if err := Verify(context.Background(), n, other); err == nil {
				t.Fatal("Verify with another mark found no difference")
			}
		})
	}
}
