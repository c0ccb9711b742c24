package agent

import (
	"encoding/json"
	"fmt"
	"sort"

	bolt "go.etcd.io/bbolt"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/store"
)

var endpointBucket = []byte("agent/endpoints")

// endpointRegistry holds the local endpoints the plugin registered, by
// container ID, in memory and in the state file: after a restart the agent
// knows which veth belongs to which pod without asking the plugin again.
type endpointRegistry struct {
	db   *store.DB
	byID map[string]api.EndpointRequest
	// pods maps "ns/name" to a container ID: every flush asks it for every
	// pod of the cluster.
	pods map[string]string
}

func openEndpointRegistry(db *store.DB) (*endpointRegistry, error) {
	r := &endpointRegistry{db: db, byID: map[string]api.EndpointRequest{}, pods: map[string]string{}}
	err := db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(endpointBucket)
		if err != nil {
			return err
		}
		return b.ForEach(func(k, v []byte) error {
			var ep api.EndpointRequest
			if err := json.Unmarshal(v, &ep); err != nil {
				return fmt.Errorf("endpoint record %q: %w", k, err)
			}
			r.index(ep)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("read endpoint registry: %w", err)
	}
	return r, nil
}

func (r *endpointRegistry) put(ep api.EndpointRequest) error {
	v, err := json.Marshal(ep)
	if err != nil {
		return err
	}
	err = r.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(endpointBucket).Put([]byte(ep.ContainerID), v)
	})
	if err != nil {
		return fmt.Errorf("store endpoint %s: %w", ep.ContainerID, err)
	}
	r.index(ep)
	return nil
}

func (r *endpointRegistry) index(ep api.EndpointRequest) {
	r.byID[ep.ContainerID] = ep
	r.pods[ep.PodNamespace+"/"+ep.PodName] = ep.ContainerID
}

func (r *endpointRegistry) remove(containerID string) (api.EndpointRequest, bool, error) {
	ep, ok := r.byID[containerID]
	if !ok {
		return ep, false, nil
	}
	err := r.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(endpointBucket).Delete([]byte(containerID))
	})
	if err != nil {
		return ep, true, fmt.Errorf("forget endpoint %s: %w", containerID, err)
	}
	delete(r.byID, containerID)
	if key := ep.PodNamespace + "/" + ep.PodName; r.pods[key] == containerID {
		delete(r.pods, key)
	}
	return ep, true, nil
}

func (r *endpointRegistry) byPod(ns, name string) (api.EndpointRequest, bool) {
	id, ok := r.pods[ns+"/"+name]
	if !ok {
		return api.EndpointRequest{}, false
	}
	return r.byID[id], true
}

func (r *endpointRegistry) all() []api.EndpointRequest {
	out := make([]api.EndpointRequest, 0, len(r.byID))
	for _, ep := range r.byID {
		out = append(out, ep)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ContainerID < out[j].ContainerID })
	return out
}
