// Package bpf loads idcni's datapath (bpf/kernel/*.c), pins it under a bpffs
// root, attaches it to pod veths and gives typed access to every map.
package bpf

//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -go-package bpf -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -type event -type reason -type stat -type scope -type counter datapath kernel/datapath.c
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -go-package bpf -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" baseline kernel/baseline.c
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -go-package bpf -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" bench kernel/bench.c
