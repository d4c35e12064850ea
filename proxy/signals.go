package proxy

import (
	"context"
	"log/slog"
	"net"

	"github.com/rolegate/rolegate/upstream"
)

// slotSignaller tells the other rolegate instances on the same server when a
// slot frees or a login lands, and hears theirs (upstream.Control
// implements it), so that a login waiting on one instance is woken by a
// session ending on another instead of at its next re-check.
type slotSignaller interface {
	SignalSlot(kind upstream.SlotKind, role, database string)
	ListenSlots(ctx context.Context, handle func(upstream.SlotEvent), onError func(error))
}

// signaller is the Limits' server view as a slotSignaller, or nil.
func (s *Server) signaller() slotSignaller {
	if s.cfg.Limits == nil {
		return nil
	}
	sig, _ := s.cfg.Limits.Server.(slotSignaller)
	return sig
}

// signalSlot tells the other instances what happened to a slot of role
// and database; it never blocks.
func (s *Server) signalSlot(kind upstream.SlotKind, role, database string) {
	if sig := s.signaller(); sig != nil {
		sig.SignalSlot(kind, role, database)
	}
}

// listenSlots starts, once, the goroutine that hears the other instances'
// slot signals and wakes this instance's waiters for them; it ends with the
// Server (Close waits for it).
//
// With a cluster, the instance registers with that connection; without an
// advertise address, at addr, the first listener's.
func (s *Server) listenSlots(addr net.Addr) {
	sig := s.signaller()
	if sig == nil {
		return
	}
	s.listenOnce.Do(func() {
		if cv := s.cluster(); cv != nil {
			if s.cfg.Cluster.Advertise == "" {
				s.cfg.Cluster.Advertise = addr.String()
			}
			cv.SetInstance(s.cfg.Cluster.Tag, s.cfg.Cluster.Advertise)
		}
		s.background.Go(func() {
			sig.ListenSlots(s.ctx, s.slotSignalled, func(err error) {
				s.quiet.log(s.log, slog.LevelWarn, "slot signals", "slot signals from other instances failed; waiters re-check on their interval", "err", err)
			})
		})
	})
}

// slotSignalled wakes the waiters a signal from another instance concerns.
func (s *Server) slotSignalled(e upstream.SlotEvent) {
	lim := s.cfg.Limits.Limiter
	for range min(e.Count, 64) { // each wakes one more waiter; a few suffice
		if e.Kind == upstream.SlotLanded {
			lim.Landed(e.Role, e.Database)
		} else {
			lim.Released(e.Role, e.Database)
		}
	}
}
