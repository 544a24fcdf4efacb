//! A table's migration phase and the moves between phases: pure, no I/O.
//!
//! ```text
//!            cutover                 cutover              finish
//!  forward ──────────▶ fenced ──────────────▶ reversed ──────────▶ finished
//!     ▲                  │ abort                │  ▲
//!     │◀─────────────────┘                      │  │ abort
//!     │        rollback            rollback     ▼  │
//!     └───────────────────────── rolling_back ─────┘
//! ```
//!
//! `fenced`: writes to the old store are refused while the forward stream drains;
//! `rolling_back`: the same for the new store while the reverse stream drains. A move to the
//! phase a table is already in is no move (commands re-run after a crash find their step done).

use std::fmt;
use std::str::FromStr;

/// Where a table is in its migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The old store is authoritative; sluice copies old → new.
    Forward,
    /// Writes to the old store are refused; the forward stream drains.
    Fenced,
    /// The new store is authoritative; sluice copies new → old.
    Reversed,
    /// Writes to the new store are refused; the reverse stream drains, then back to forward.
    RollingBack,
    /// The reverse direction stopped for good: the point of no return.
    Finished,
}

impl Phase {
    /// Every phase, in the order of a migration.
    pub const ALL: [Phase; 5] =
        [Phase::Forward, Phase::Fenced, Phase::Reversed, Phase::RollingBack, Phase::Finished];

    /// The phase's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Fenced => "fenced",
            Phase::Reversed => "reversed",
            Phase::RollingBack => "rolling_back",
            Phase::Finished => "finished",
        }
    }

    /// Which direction streams in this phase: the old store's changes go forward in
    /// `forward` and `fenced` (draining), the new store's go back in `reversed` and
    /// `rolling_back` (draining).
    pub fn direction(self) -> Option<Direction> {
        match self {
            Phase::Forward | Phase::Fenced => Some(Direction::Forward),
            Phase::Reversed | Phase::RollingBack => Some(Direction::Reverse),
            Phase::Finished => None,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Text that names no phase.
#[derive(Debug, thiserror::Error)]
#[error("unknown migration phase {0:?} (expected forward, fenced, reversed, rolling_back or finished)")]
pub struct UnknownPhase(pub String);

impl FromStr for Phase {
    type Err = UnknownPhase;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Phase::ALL.into_iter().find(|p| p.as_str() == text).ok_or_else(|| UnknownPhase(text.to_owned()))
    }
}

/// Which way a table's changes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Old store → new store.
    Forward,
    /// New store → old store.
    Reverse,
}

impl Direction {
    /// `forward` or `reverse`, as in replication origin names.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Reverse => "reverse",
        }
    }
}

/// A move between phases, by the command that makes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `cutover`, first step: fence the old store.
    Fence,
    /// `cutover`, last step: the new store is authoritative.
    Reverse,
    /// `cutover` stopped (verify found differences, or the operator's `unfence`).
    AbortCutover,
    /// `rollback`, first step: fence the new store.
    StartRollback,
    /// `rollback`, last step: the old store is authoritative again.
    CompleteRollback,
    /// `rollback` stopped: the new store stays authoritative.
    AbortRollback,
    /// `finish`: the reverse direction stops for good.
    Finish,
}

impl Step {
    /// The phase the step starts from and the one it ends in.
    pub fn phases(self) -> (Phase, Phase) {
        match self {
            Step::Fence => (Phase::Forward, Phase::Fenced),
            Step::Reverse => (Phase::Fenced, Phase::Reversed),
            Step::AbortCutover => (Phase::Fenced, Phase::Forward),
            Step::StartRollback => (Phase::Reversed, Phase::RollingBack),
            Step::CompleteRollback => (Phase::RollingBack, Phase::Forward),
            Step::AbortRollback => (Phase::RollingBack, Phase::Reversed),
            Step::Finish => (Phase::Reversed, Phase::Finished),
        }
    }

    /// What the operator ran, for messages.
    pub fn command(self) -> &'static str {
        match self {
            Step::Fence | Step::Reverse => "cutover",
            Step::AbortCutover => "unfence",
            Step::StartRollback | Step::CompleteRollback => "rollback",
            Step::AbortRollback => "rollback (abandoned)",
            Step::Finish => "finish",
        }
    }
}

/// What a step does to a table in phase `current`.
#[derive(Debug, PartialEq, Eq)]
pub enum Move {
    /// From the step's start phase to its end phase.
    To(Phase),
    /// The table is already where the step ends: nothing to do.
    AlreadyThere,
}

/// A step refused: the table is in neither the step's start phase nor its end phase.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("table {table} is {current}: {command} needs it {from} (it would become {to})")]
pub struct IllegalMove {
    /// The table, `schema.table`.
    pub table: String,
    /// Its phase.
    pub current: Phase,
    /// The command that asked.
    pub command: &'static str,
    /// The phase the step starts from.
    pub from: Phase,
    /// The phase it ends in.
    pub to: Phase,
}

/// Decides `step` for `table` in phase `current`.
pub fn decide(table: &str, current: Phase, step: Step) -> Result<Move, IllegalMove> {
    let (from, to) = step.phases();
    if current == to {
        Ok(Move::AlreadyThere)
    } else if current == from {
        Ok(Move::To(to))
    } else {
        Err(IllegalMove { table: table.to_owned(), current, command: step.command(), from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: [Step; 7] = [
        Step::Fence,
        Step::Reverse,
        Step::AbortCutover,
        Step::StartRollback,
        Step::CompleteRollback,
        Step::AbortRollback,
        Step::Finish,
    ];

    #[test]
    fn phases_read_back_as_written() {
        for phase in Phase::ALL {
            assert_eq!(phase.as_str().parse::<Phase>().unwrap(), phase);
        }
        assert!("cutover".parse::<Phase>().unwrap_err().to_string().contains("\"cutover\""));
    }

    #[test]
    fn the_whole_program_forward_cutover_rollback_cutover_finish() {
        let mut phase = Phase::Forward;
        for step in [
            Step::Fence,
            Step::Reverse,
            Step::StartRollback,
            Step::CompleteRollback,
            Step::Fence,
            Step::Reverse,
            Step::Finish,
        ] {
            match decide("public.orders", phase, step).unwrap() {
                Move::To(next) => phase = next,
                Move::AlreadyThere => panic!("{step:?} from {phase} moves"),
            }
        }
        assert_eq!(phase, Phase::Finished);
    }

    #[test]
    fn every_step_is_idempotent_and_refused_elsewhere_naming_both_phases() {
        for step in STEPS {
            let (from, to) = step.phases();
            assert_eq!(decide("t", to, step), Ok(Move::AlreadyThere), "{step:?} re-run");
            for current in Phase::ALL {
                if current == from || current == to {
                    continue;
                }
                let refused = decide("public.orders", current, step).unwrap_err();
                let message = refused.to_string();
                assert!(
                    message.contains("public.orders")
                        && message.contains(current.as_str())
                        && message.contains(from.as_str()),
                    "{message}"
                );
            }
        }
        // Nothing leaves `finished`.
        for step in STEPS.into_iter().filter(|s| s.phases().1 != Phase::Finished) {
            assert!(decide("t", Phase::Finished, step).is_err(), "{step:?}");
        }
    }

    #[test]
    fn fenced_phases_drain_the_direction_they_stop_writing_into() {
        assert_eq!(Phase::Fenced.direction(), Some(Direction::Forward));
        assert_eq!(Phase::RollingBack.direction(), Some(Direction::Reverse));
        assert_eq!(Phase::Finished.direction(), None);
    }
}
