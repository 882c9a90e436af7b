package meshtest

import "github.com/containernetworking/plugins/pkg/ns"

type nsNetNS = ns.NetNS
