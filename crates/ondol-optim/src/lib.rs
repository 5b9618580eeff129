//! ondol-optim: AdamW over the flat parameter buffer, gradient clipping by global norm,
//! and learning-rate schedules, each with the config section that drives it.

mod adamw;
mod schedule;

pub use adamw::{AdamW, OptimizerConfig};
pub use schedule::{Decay, LrSchedule, SchedulerConfig};
