package manifests_test

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// The agent pins under /sys/fs/bpf, which the runtimes' default AppArmor
// profiles (containerd's cri-containerd.apparmor.d, CRI-O's crio-default)
// deny writes to in a container that is not privileged: the DaemonSet must
// say Unconfined for the agent, and only for it (install-cni copies files
// into /opt/cni/bin, which the default profile allows).
func TestAgentAppArmorProfile(t *testing.T) {
	spec := loadInstall(t).ds.Spec.Template.Spec
	if spec.SecurityContext != nil && spec.SecurityContext.AppArmorProfile != nil {
		t.Errorf("pod-level appArmorProfile %+v: set it on the agent container only", spec.SecurityContext.AppArmorProfile)
	}
	agent := container(t, spec.Containers, "agent")
	if p := agent.SecurityContext.AppArmorProfile; p == nil || p.Type != corev1.AppArmorProfileTypeUnconfined {
		t.Errorf("agent appArmorProfile = %+v, want Unconfined: the runtime's default profile denies pinning under /sys/fs/bpf", p)
	}
	install := container(t, spec.InitContainers, "install-cni")
	if p := install.SecurityContext.AppArmorProfile; p != nil && p.Type != corev1.AppArmorProfileTypeRuntimeDefault {
		t.Errorf("install-cni appArmorProfile = %+v; copying files needs no exemption", p)
	}
}
