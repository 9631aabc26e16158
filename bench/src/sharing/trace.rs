//! The seeded mixed trace: the services, their models and job sizes, and
//! the arrivals every policy replays.

use serde::{Deserialize, Serialize};

/// One MiB-denominated GiB.
pub(crate) const GIB: u64 = 1024;

/// The simulated card's memory, in MiB.
pub(crate) const CARD_MIB: u64 = 24 * GIB;

/// The safety margin the broker keeps, and the simulator checks, in MiB.
pub(crate) const SAFETY_MARGIN_MIB: u64 = 512;

/// How long loading a model takes, in simulated seconds.
pub(crate) const MODEL_LOAD_S: f64 = 5.0;

/// A service sharing the card.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Service {
    /// Its consumer name.
    pub(crate) name: String,
    /// The broker's `kind`.
    pub(crate) kind: String,
    /// The model it keeps loaded while idle (0: none), in MiB.
    pub(crate) model_mib: u64,
    /// The memory a job needs beyond the model, in MiB.
    pub(crate) job_mib: u64,
    /// May stay resident beside others, never asked to unload.
    pub(crate) coexist: bool,
    /// Listens on a `Residency` stream and unloads when asked.
    pub(crate) unloads_on_request: bool,
}

impl Service {
    /// What one job needs on the card in all: its model and its job memory.
    pub(crate) fn need_mib(&self) -> u64 {
        self.model_mib + self.job_mib
    }
}

/// The four services of the replay.
pub(crate) fn services() -> Vec<Service> {
    let service = |name: &str, kind: &str, model: u64, job: u64, coexist, unloads| Service {
        name: name.into(),
        kind: kind.into(),
        model_mib: model * GIB,
        job_mib: job * GIB,
        coexist,
        unloads_on_request: unloads,
    };
    vec![
        service("tts", "tts", 3, 1, true, false),
        service("llm", "llm", 10, 2, false, true),
        service("image", "image", 8, 6, false, true),
        // A training run loads nothing to keep: all its memory is the job's.
        service("train", "other", 0, 16, false, false),
    ]
}

/// One job of the trace.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Arrival {
    /// Its number in the trace, in arrival order.
    pub(crate) id: usize,
    /// The index of its service in [`services`].
    pub(crate) service: usize,
    /// When it arrives, in simulated seconds from the start.
    pub(crate) at_s: f64,
    /// How long it computes once it runs, in simulated seconds.
    pub(crate) work_s: f64,
}

/// A small deterministic generator (splitmix64): the same seed gives the
/// same trace on every machine, with no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Exponential with this mean: the gap between Poisson arrivals.
    fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

/// The arrivals of `duration_s` simulated seconds from `seed`, sorted by
/// time. The mix (BENCHMARKS.md, "The sharing benchmark"): TTS in bursts of
/// short jobs, LLM and image requests as Poisson arrivals, and one training
/// run of several minutes every quarter of an hour or so. `load` scales
/// the rate of the TTS bursts, LLM and image requests (1: the default mix).
pub(crate) fn generate(seed: u64, duration_s: f64, load: f64) -> Vec<Arrival> {
    let mut rng = Rng(seed ^ 0x005e_ed0f_9a1e);
    let mut jobs: Vec<(usize, f64, f64)> = Vec::new();
    // TTS: a burst every 2 minutes on average, of 4–12 jobs 0.5–2 s apart,
    // each 1–4 s of work.
    let mut t = rng.exponential(60.0 / load);
    while t < duration_s {
        let burst = 4 + (rng.next() % 9) as usize;
        let mut at = t;
        for _ in 0..burst {
            if at >= duration_s {
                break;
            }
            jobs.push((0, at, rng.between(1.0, 4.0)));
            at += rng.between(0.5, 2.0);
        }
        t += rng.exponential(120.0 / load);
    }
    // LLM: a request a minute on average, 5–25 s each.
    let mut t = rng.exponential(60.0 / load);
    while t < duration_s {
        jobs.push((1, t, rng.between(5.0, 25.0)));
        t += rng.exponential(60.0 / load);
    }
    // Image: one every 90 s on average, 10–30 s each.
    let mut t = rng.exponential(90.0 / load);
    while t < duration_s {
        jobs.push((2, t, rng.between(10.0, 30.0)));
        t += rng.exponential(90.0 / load);
    }
    // Training: 7–10 minutes of work (a quarter of a short run), starting
    // within the first 6 minutes, then one every 15–20 minutes.
    let training_s = (duration_s / 4.0).min(rng.between(420.0, 600.0));
    let mut t = rng.between(0.03, 0.2) * duration_s.min(1800.0);
    while t + training_s / 2.0 < duration_s {
        jobs.push((3, t, training_s));
        t += rng.between(900.0, 1200.0);
    }
    jobs.sort_by(|a, b| a.1.total_cmp(&b.1));
    jobs.into_iter()
        .enumerate()
        .map(|(id, (service, at_s, work_s))| Arrival {
            id,
            service,
            at_s,
            work_s,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::generate;

    #[test]
    fn a_seed_gives_one_trace_and_every_service_appears() {
        let a = generate(7, 1800.0, 1.0);
        let b = generate(7, 1800.0, 1.0);
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.at_s == y.at_s));
        assert!(a.windows(2).all(|w| w[0].at_s <= w[1].at_s));
        for service in 0..4 {
            assert!(a.iter().any(|job| job.service == service), "{service}");
        }
        let other = generate(8, 1800.0, 1.0);
        assert!(other.len() != a.len() || other[0].at_s != a[0].at_s);
        assert!(generate(7, 1800.0, 2.0).len() > a.len());
    }
}
