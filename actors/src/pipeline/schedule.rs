//! Pipeline schedules as data: for each stage (in pipeline order: vision, LLM shards, diffusion) the list
//! of forward and backward operations on microbatches it runs in one step. New schedules (interleaved,
//! zero-bubble) are new functions returning the same shape.

use deem::config::PipelineSchedule;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Forward(u32),
    Backward(u32),
}

/// GPipe: every forward, then every backward (in the same microbatch order, as the activations of the
/// next stage's backward arrive).
pub fn gpipe(stages: usize, m: u32) -> Vec<Vec<Op>> {
    (0..stages)
        .map(|_| {
            (0..m)
                .map(Op::Forward)
                .chain((0..m).map(Op::Backward))
                .collect()
        })
        .collect()
}

/// 1F1B: stage `i` of `p` runs `min(p − i − 1, m)` warm-up forwards, then alternates one forward and
/// one backward, then drains the remaining backwards — at most `p − i` microbatches in flight.
pub fn one_f_one_b(stages: usize, m: u32) -> Vec<Vec<Op>> {
    (0..stages)
        .map(|i| {
            let warmup = ((stages - i - 1) as u32).min(m);
            let mut ops: Vec<Op> = (0..warmup).map(Op::Forward).collect();
            let (mut f, mut b) = (warmup, 0);
            while f < m {
                ops.push(Op::Forward(f));
                f += 1;
                ops.push(Op::Backward(b));
                b += 1;
            }
            ops.extend((b..m).map(Op::Backward));
            ops
        })
        .collect()
}

pub fn build(kind: PipelineSchedule, stages: usize, m: u32) -> Vec<Vec<Op>> {
    match kind {
        PipelineSchedule::Gpipe => gpipe(stages, m),
        PipelineSchedule::OneFOneB => one_f_one_b(stages, m),
    }
}

/// Largest number of microbatches a stage holds activations for at once.
pub fn max_in_flight(ops: &[Op]) -> u32 {
    let mut live = 0i64;
    let mut most = 0i64;
    for op in ops {
        live += if matches!(op, Op::Forward(_)) { 1 } else { -1 };
        most = most.max(live);
    }
    most as u32
}

/// The ideal bubble fraction `(p − 1) / (m + p − 1)` of GPipe and 1F1B with equal stages.
pub fn bubble_fraction(stages: usize, m: u32) -> f64 {
    (stages as f64 - 1.0) / (m as f64 + stages as f64 - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_complete(s: &[Vec<Op>], m: u32) {
        for ops in s {
            for mb in 0..m {
                let f = ops
                    .iter()
                    .position(|o| *o == Op::Forward(mb))
                    .expect("every forward");
                let b = ops
                    .iter()
                    .position(|o| *o == Op::Backward(mb))
                    .expect("every backward");
                assert!(f < b, "forward before backward");
            }
            assert_eq!(ops.len(), 2 * m as usize);
        }
    }

    #[test]
    fn one_f_one_b_limits_activations_in_flight() {
        for (p, m) in [(4, 4), (4, 8), (4, 1), (5, 3), (2, 6)] {
            let s = one_f_one_b(p, m);
            check_complete(&s, m);
            for (i, ops) in s.iter().enumerate() {
                assert!(
                    max_in_flight(ops) as usize <= (p - i).min(m as usize),
                    "stage {i} of {p}, m {m}: {ops:?}"
                );
            }
        }
        use Op::*;
        assert_eq!(
            one_f_one_b(3, 4)[0],
            vec![
                Forward(0),
                Forward(1),
                Forward(2),
                Backward(0),
                Forward(3),
                Backward(1),
                Backward(2),
                Backward(3)
            ]
        );
        assert_eq!(
            one_f_one_b(3, 4)[2],
            vec![
                Forward(0),
                Backward(0),
                Forward(1),
                Backward(1),
                Forward(2),
                Backward(2),
                Forward(3),
                Backward(3)
            ]
        );
    }

    #[test]
    fn gpipe_holds_every_microbatch() {
        let s = gpipe(4, 6);
        check_complete(&s, 6);
        assert!(s.iter().all(|ops| max_in_flight(ops) == 6));
        assert!((bubble_fraction(4, 4) - 3.0 / 7.0).abs() < 1e-12);
    }
}
