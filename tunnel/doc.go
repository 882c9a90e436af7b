// Package tunnel is Ambit's data path: HBONE (HTTP/2 CONNECT over mutual
// TLS) between enrolled pods, with the outbound capture (15001), inbound
// plaintext (15006) and inbound HBONE (15008) listeners of every pod.
//
// The flow, from accept to splice:
//
//	app ──REDIRECT──▶ 15001 (source pod netns) ──outbound──▶ original dst
//	   ├─ meshed pod IP / Service VIP ─▶ pooled mTLS h2 conn to dst:15008,
//	   │                                  CONNECT dst:port as src identity
//	   └─ outside the mesh ──────────────▶ plaintext passthrough (marked)
//	15008 (destination pod netns) ──inbound──▶ verify peer, authorize,
//	   dial app from the client's IP (transparent), splice
//	15006 ──▶ plaintext inbound: permissive or strict per Authorizer
//
// The package knows nothing of Kubernetes: see api.go for what it is given.
package tunnel
