package upstream

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/rolegate/rolegate/config"
)

// Slot signals between two instances: each hears the other's, coalesced,
// never its own, and anything else on the channel is ignored. Notifications
// arrive in commit order, so an instance's first event after a sequence of
// sends shows what was filtered before it.
func TestSlotSignals(t *testing.T) {
	t.Parallel()
	c := controlCluster(t)
	dsn := c.DSN("rolegate", controlPW, "postgres")
	a := newControl(t, config.Control{DSN: dsn, MaxConns: 2}, "")
	b := newControl(t, config.Control{DSN: dsn, MaxConns: 2}, "")
	a.SignalSlot(SlotFreed, "dropped", "d") // nobody listens yet: dropped, never sent

	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	heard := func(ctl *Control) <-chan SlotEvent {
		ch := make(chan SlotEvent, 100)
		wg.Go(func() {
			ctl.ListenSlots(ctx, func(e SlotEvent) { ch <- e }, func(err error) { t.Logf("slot signals: %v", err) })
		})
		return ch
	}
	fromB, fromA := heard(a), heard(b) // what a hears comes from b, and the other way round
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(time.Minute)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitFor("both listening", func() bool { return a.SlotListening() && b.SlotListening() })
	next := func(ch <-chan SlotEvent) SlotEvent {
		t.Helper()
		select {
		case e := <-ch:
			return e
		case <-time.After(time.Minute):
			t.Fatal("no slot signal within a minute")
		}
		return SlotEvent{}
	}

	su := connect(t, c.SuperDSN())
	for _, p := range []string{"not json", `{"i":"x","k":"freed","r":"r","d":"d","n":0}`, `{"i":"x","k":"other","r":"r","d":"d","n":1}`} {
		if _, err := su.Exec(ctx, "select pg_notify('rolegate_slots', $1)", p); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		a.SignalSlot(SlotFreed, "r1", "d1")
	}
	freed := 0
	for freed < 3 { // coalesced into one signal or a few, as they were sent
		e := next(fromA)
		if e.Kind != SlotFreed || e.Role != "r1" || e.Database != "d1" || e.Count < 1 {
			t.Fatalf("b heard %+v, want freed r1/d1 (the junk before it ignored)", e)
		}
		freed += e.Count
	}
	if freed != 3 {
		t.Fatalf("b heard %d slots freed, want 3", freed)
	}
	b.SignalSlot(SlotLanded, "r2", "")
	if e := next(fromB); e != (SlotEvent{Kind: SlotLanded, Role: "r2", Count: 1}) {
		t.Fatalf("a heard %+v first, want b's landed r2 (its own signals and the junk left out)", e)
	}
	cancel()
	wg.Wait()
	if a.SlotListening() || b.SlotListening() {
		t.Error("still listening after ListenSlots returned")
	}
}
