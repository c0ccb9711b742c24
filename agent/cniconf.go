package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// WriteCNIConf writes the plugin's conflist into the CNI config directory,
// pointing the plugin at this agent and requiring it. Until this file
// exists the runtime reports the network not ready, so no pod starts before
// its policy can be enforced. The file is written in place, not renamed in:
// containerd 1.6 ignores files that appear by rename.
func (a *Agent) WriteCNIConf() error {
	if a.cfg.CNIConfDir == "" {
		return nil
	}
	var conf map[string]any
	if err := json.Unmarshal(a.cfg.CNIConf, &conf); err != nil {
		return fmt.Errorf("CNI config template: %w", err)
	}
	plugins, _ := conf["plugins"].([]any)
	for _, p := range plugins {
		if pm, ok := p.(map[string]any); ok && pm["type"] == "idcni" {
			pm["agentSocket"] = a.cfg.Socket
			pm["agentRequired"] = true
			if a.cfg.BPFRoot != "" {
				pm["bpfRoot"] = a.cfg.BPFRoot
			}
		}
	}
	out, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(a.cfg.CNIConfDir, 0o755); err != nil {
		return fmt.Errorf("create CNI config directory: %w", err)
	}
	path := filepath.Join(a.cfg.CNIConfDir, a.cfg.CNIConfName)
	if err := os.WriteFile(path, append(out, '\n'), 0o644); err != nil {
		return fmt.Errorf("write CNI config %s: %w", path, err)
	}
	a.log.Info("CNI config written", "path", path)
	return nil
}

// Uninstall removes the CNI config (the node turns NotReady for new pods)
// and every pin of the datapath (programs detach from all veths).
func Uninstall(confDir, confName, bpfRoot string) error {
	var errs []error
	if confDir != "" {
		if err := os.Remove(filepath.Join(confDir, confName)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	errs = append(errs, removePins(bpfRoot))
	return errors.Join(errs...)
}
