//! Keeps one process's ledger appends of a member in the order the script applied them,
//! without holding anything across the script's round trip.
//!
//! Every operation takes a [`Ticket`] before it sends its script, so several scripts of one
//! member can be in flight at once (Redis runs them in arrival order, one after the other).
//! A change the script applied learns its version, and [`Ticket::turn`] waits until no
//! other operation of the member in this process can be an earlier change: one that took
//! its ticket before this script's answer came back and whose script has not answered yet
//! (whatever the order of the tickets, its script may have run first), or one that
//! answered with a lower version and has not been queued on the ledger. Operations that
//! take a ticket after the answer send their scripts later, so they never hold one up and
//! a member under constant traffic cannot starve. Waits only ever point from a known
//! version to a lower one or to an unanswered script, which answers without waiting, so
//! they cannot form a cycle.
//!
//! The order matters for speed: a change queued before the one it follows is refused by
//! the ledger and must be committed again on its own, after it, and the member's next
//! changes queue behind that.
//!
//! This is an optimisation, not a safety rule: the ledger accepts a change only on top of
//! the state it was computed from, and a change queued too early waits for its predecessor
//! there (see `RedisBalanceStore::settle`).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Stripes of the table of operations in flight; each has its own lock and wake-up.
const STRIPES: usize = 1024;

/// Longest a change waits for its turn before it is queued anyway (the ledger still keeps
/// the order).
const MAX_WAIT: Duration = Duration::from_secs(1);

/// A ticket's id and, once its script answered with a change, the change's version.
type InFlight = (u64, Option<i64>);

#[derive(Debug, Default)]
struct Stripe {
    /// Per member: the tickets in flight.
    members: Mutex<HashMap<String, Vec<InFlight>>>,
    changed: tokio::sync::Notify,
}

impl Stripe {
    /// The table of tickets; a panic elsewhere while holding it leaves it consistent (every
    /// change is one insert, update or removal), so a poisoned lock is used as it is.
    fn members(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<InFlight>>> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
pub struct Sequencer {
    stripes: Vec<Stripe>,
    next: std::sync::atomic::AtomicU64,
    max_wait: Duration,
}

impl Default for Sequencer {
    fn default() -> Self {
        Self::with_max_wait(MAX_WAIT)
    }
}

impl Sequencer {
    fn with_max_wait(max_wait: Duration) -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            next: std::sync::atomic::AtomicU64::new(0),
            max_wait,
        }
    }

    /// Registers an operation on `member` (any string naming it uniquely) about to send its
    /// script. Dropping the ticket withdraws it.
    pub fn enter(self: &Arc<Self>, member: &str) -> Ticket {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        member.hash(&mut h);
        let stripe = (h.finish() % STRIPES as u64) as usize;
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.stripes[stripe]
            .members()
            .entry(member.to_string())
            .or_default()
            .push((id, None));
        Ticket {
            sequencer: self.clone(),
            stripe,
            member: member.to_string(),
            id,
        }
    }

    /// Operations in flight, over all members (for tests).
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.members().values().map(Vec::len).sum::<usize>())
            .sum()
    }
}

/// One operation's place among its member's operations in flight in this process.
#[derive(Debug)]
pub struct Ticket {
    sequencer: Arc<Sequencer>,
    stripe: usize,
    member: String,
    id: u64,
}

impl Ticket {
    fn stripe(&self) -> &Stripe {
        &self.sequencer.stripes[self.stripe]
    }

    /// Records that the script applied the change with `version`, and waits until every
    /// earlier change of the member from this process has been queued on the ledger.
    pub async fn turn(&self, version: i64) {
        let stripe = self.stripe();
        let deadline = tokio::time::Instant::now() + self.sequencer.max_wait;
        // Operations that take a ticket from now on send their scripts after this one ran,
        // so their changes come later; any taken before may still be the one before it.
        let horizon = self
            .sequencer
            .next
            .load(std::sync::atomic::Ordering::SeqCst);
        let mut announced = false;
        loop {
            // Registered before the check, so a wake-up between the two is not lost.
            let changed = stripe.changed.notified();
            {
                let mut members = stripe.members();
                let Some(tickets) = members.get_mut(&self.member) else {
                    return;
                };
                let mut blocked = false;
                for (id, known) in tickets.iter_mut() {
                    if *id == self.id {
                        *known = Some(version);
                    } else if known.map_or(*id < horizon, |v| v < version) {
                        blocked = true;
                    }
                }
                if !blocked {
                    return;
                }
            }
            if !announced {
                // An operation that took its ticket first but whose script ran later may be
                // waiting for this one's version to be known.
                announced = true;
                stripe.changed.notify_waiters();
                continue;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let stripe = &self.sequencer.stripes[self.stripe];
        {
            let mut members = stripe.members();
            if let Some(tickets) = members.get_mut(&self.member) {
                tickets.retain(|(id, _)| *id != self.id);
                if tickets.is_empty() {
                    members.remove(&self.member);
                }
            }
        }
        stripe.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long enough that a test never mistakes the fallback for a wake-up.
    const LIVE: Duration = Duration::from_secs(20);

    fn patient() -> Arc<Sequencer> {
        Arc::new(Sequencer::with_max_wait(Duration::from_secs(60)))
    }

    #[tokio::test]
    async fn a_change_waits_for_the_earlier_ones_and_for_unanswered_scripts() {
        let seq = patient();
        let first = seq.enter("m");
        let second = seq.enter("m");
        let other = seq.enter("n");
        // Another member never waits.
        tokio::time::timeout(LIVE, other.turn(1)).await.unwrap();
        // Version 6 answered first: it waits for the script that has not answered.
        let waiting = spawn_turn(second, 6);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        // The other script answers with version 5: it goes first, without waiting.
        tokio::time::timeout(LIVE, first.turn(5)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "5 is not queued yet");
        drop(first);
        let second = tokio::time::timeout(LIVE, waiting).await.unwrap().unwrap();
        drop((second, other));
        assert_eq!(seq.in_flight(), 0, "nothing is left behind");
    }

    #[tokio::test]
    async fn a_later_change_never_holds_up_an_earlier_one() {
        let seq = patient();
        let early = seq.enter("m");
        let late = seq.enter("m");
        late_known(&late, 9).await;
        tokio::time::timeout(LIVE, early.turn(8)).await.unwrap();
    }

    #[tokio::test]
    async fn scripts_that_ran_in_another_order_than_their_tickets_do_not_wait() {
        let seq = patient();
        let first = seq.enter("m");
        let second = seq.enter("m");
        // The second ticket's script ran first (version 5): it waits for the first...
        let waiting = spawn_turn(second, 5);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // ...whose version 6 then shows it is not an earlier change; the first waits for 5.
        let first_turn = spawn_turn(first, 6);
        let second = tokio::time::timeout(LIVE, waiting)
            .await
            .expect("the second is released once the first's version is known")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!first_turn.is_finished(), "6 waits for 5 to be queued");
        drop(second);
        let first = tokio::time::timeout(LIVE, first_turn)
            .await
            .unwrap()
            .unwrap();
        drop(first);
        assert_eq!(seq.in_flight(), 0);
    }

    #[tokio::test]
    async fn an_operation_that_came_after_the_answer_is_not_waited_for() {
        let seq = patient();
        let blocker = seq.enter("m");
        let first = seq.enter("m");
        let waiting = spawn_turn(first, 6);
        // Once the first waits with its version known...
        until_known(&seq, "m", 6).await;
        // ...a ticket taken now sends its script later, whatever it is.
        let _later = seq.enter("m");
        drop(blocker);
        tokio::time::timeout(LIVE, waiting).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_ticket_taken_later_whose_script_ran_first_is_waited_for() {
        let seq = patient();
        let first = seq.enter("m");
        let second = seq.enter("m");
        // The first answers with 6 while the second's script (version 5) is unanswered.
        let waiting = spawn_turn(first, 6);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        tokio::time::timeout(LIVE, second.turn(5)).await.unwrap();
        drop(second);
        tokio::time::timeout(LIVE, waiting).await.unwrap().unwrap();
    }

    /// Runs `ticket`'s turn for `version` on a task of its own, handing the ticket back.
    fn spawn_turn(ticket: Ticket, version: i64) -> tokio::task::JoinHandle<Ticket> {
        tokio::spawn(async move {
            ticket.turn(version).await;
            ticket
        })
    }

    /// Waits until a ticket of `member` has answered with `version`.
    async fn until_known(seq: &Sequencer, member: &str, version: i64) {
        let known = || {
            seq.stripes.iter().any(|s| {
                s.members()
                    .get(member)
                    .is_some_and(|t| t.iter().any(|(_, v)| *v == Some(version)))
            })
        };
        while !known() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Marks `ticket` as answered with `version` without waiting for its turn.
    async fn late_known(ticket: &Ticket, version: i64) {
        let _ = tokio::time::timeout(Duration::from_millis(10), ticket.turn(version)).await;
    }

    #[tokio::test]
    async fn a_wait_for_a_change_of_another_process_ends() {
        let seq = Arc::new(Sequencer::with_max_wait(Duration::from_millis(200)));
        let _stuck = seq.enter("m");
        let t = seq.enter("m");
        let started = tokio::time::Instant::now();
        t.turn(3).await;
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
