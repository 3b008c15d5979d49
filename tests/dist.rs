//! The distributed engine on Gloo over 127.0.0.1: ranks are threads of this test process (each its own
//! TCPStore client and process group, exactly as separate processes would be), checking point-to-point,
//! collectives, framed messages, the launch contract and the rendezvous's errors.

mod common;

use std::time::Duration;

use deem_actors::dist::c10d::{self, GroupSpec};
use deem_actors::dist::wire::{self, Header};
use deem_actors::dist::{DistError, LaunchEnv, World};
use deem_actors::dist::{Group, Store};
use tch::{Kind, Tensor};

fn env(rank: i64, world: i64, port: u16) -> LaunchEnv {
    let vars = [
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", port.to_string()),
    ];
    LaunchEnv::from_vars(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
        .unwrap()
        .unwrap()
}

/// Runs `f(world)` on `n` ranks (threads) and returns their results in rank order.
fn on_ranks<T: Send + 'static>(
    n: i64,
    timeout: Duration,
    f: impl Fn(World) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let port = common::free_port();
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let f = f.clone();
            std::thread::spawn(move || f(World::join(env(r, n, port), timeout).unwrap()))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn send_recv_and_collectives_move_the_right_numbers() {
    let out = on_ranks(3, Duration::from_secs(30), |w| {
        let g = &w.group;
        // p2p: rank 0 sends 1 MiB of floats to 1 and 2, which send them back doubled.
        let x = Tensor::arange(262_144, (Kind::Float, tch::Device::Cpu));
        let mut echoed = Vec::new();
        if w.rank() == 0 {
            for peer in [1, 2] {
                g.send(&x, peer, 7).unwrap();
            }
            for peer in [1, 2] {
                let back = Tensor::zeros([262_144], (Kind::Float, tch::Device::Cpu));
                g.recv(&back, peer, 8).unwrap();
                echoed.push(back);
            }
        } else {
            let got = Tensor::zeros([262_144], (Kind::Float, tch::Device::Cpu));
            g.recv(&got, 0, 7).unwrap();
            g.send(&(&got * 2.0), 0, 8).unwrap();
        }
        // all_reduce of a bucket of two tensors, broadcast, barrier.
        let a = Tensor::from_slice(&[w.rank() as f64, 1.0]);
        let b = Tensor::from_slice(&[10i64 * (w.rank() + 1)]);
        g.all_reduce(&b).unwrap();
        // A bucketed reduce of mixed shapes and dtypes, in buckets smaller than one tensor.
        let m = Tensor::ones([3, 5], (Kind::Float, tch::Device::Cpu)) * (w.rank() + 1);
        let n = Tensor::from_slice(&[1.0f32, 2.0]);
        let bytes = g
            .all_reduce_buckets(
                &[a.shallow_clone(), m.shallow_clone(), n.shallow_clone()],
                16,
            )
            .unwrap();
        assert_eq!(bytes, 16 + 60 + 8);
        assert_eq!(
            Vec::<f32>::try_from(&m.reshape([-1])).unwrap(),
            vec![6.0; 15]
        );
        assert_eq!(Vec::<f32>::try_from(&n).unwrap(), vec![3.0, 6.0]);
        let c = if w.rank() == 2 {
            Tensor::from_slice(&[42.0f32, 43.0])
        } else {
            Tensor::zeros([2], (Kind::Float, tch::Device::Cpu))
        };
        g.broadcast(&c, 2).unwrap();
        g.barrier().unwrap();
        (
            Vec::<f64>::try_from(&a).unwrap(),
            Vec::<i64>::try_from(&b).unwrap(),
            Vec::<f32>::try_from(&c).unwrap(),
            echoed
                .iter()
                .map(|t| (t - &x * 2.0).abs().max().double_value(&[]))
                .collect::<Vec<_>>(),
        )
    });
    for (r, (a, b, c, echo)) in out.iter().enumerate() {
        assert_eq!(a, &vec![3.0, 3.0], "rank {r}");
        assert_eq!(b, &vec![60], "rank {r}");
        assert_eq!(c, &vec![42.0, 43.0], "rank {r}");
        if r == 0 {
            assert_eq!(echo, &vec![0.0, 0.0]);
        }
    }
}

#[test]
fn framed_messages_carry_header_shapes_and_dtypes() {
    let out = on_ranks(2, Duration::from_secs(30), |w| {
        let g = &w.group;
        let header = |n: u64| Header {
            edge: "vision→llm".into(),
            seq: n,
            id: [n as u8; 16],
            tensors: None,
            index: vec![0, 2],
            trace: format!("step 3/mb {n}"),
        };
        if w.rank() == 0 {
            let ts = [
                Tensor::randn([2, 3, 4], (Kind::Float, tch::Device::Cpu)),
                Tensor::from_slice(&[true, false, true]),
                Tensor::zeros([0, 5], (Kind::Float, tch::Device::Cpu)),
            ];
            let mut pending = wire::send(g, 1, 3, header(1), Some(&ts)).unwrap();
            pending.extend(wire::send(g, 1, 3, header(2), None).unwrap());
            for p in pending {
                p.wait().unwrap();
            }
            let back = Tensor::zeros([2, 3, 4], (Kind::Float, tch::Device::Cpu));
            g.recv(&back, 1, 4).unwrap();
            vec![(&back - &ts[0]).abs().max().double_value(&[])]
        } else {
            let (h, ts) = wire::recv(g, 0, 3, "vision→llm", tch::Device::Cpu).unwrap();
            assert_eq!(h.seq, 1);
            assert_eq!(h.index, vec![0, 2]);
            assert_eq!(h.trace, "step 3/mb 1");
            let ts = ts.unwrap();
            assert_eq!(ts[0].size(), vec![2, 3, 4]);
            assert_eq!(ts[1].kind(), Kind::Bool);
            assert_eq!(
                Vec::<bool>::try_from(&ts[1]).unwrap(),
                vec![true, false, true]
            );
            assert_eq!(ts[2].size(), vec![0, 5]);
            let (h2, none) = wire::recv(g, 0, 3, "vision→llm", tch::Device::Cpu).unwrap();
            assert_eq!((h2.seq, none.is_none()), (2, true));
            g.send(&ts[0], 0, 4).unwrap();
            vec![]
        }
    });
    assert_eq!(out[0], vec![0.0]);
}

#[test]
fn a_frame_for_another_edge_or_garbage_is_refused() {
    let h = Header {
        edge: "a".into(),
        seq: 0,
        id: [0; 16],
        tensors: Some(vec![wire::Meta {
            shape: vec![2],
            kind: 0,
        }]),
        index: vec![],
        trace: String::new(),
    };
    let frame = wire::encode(&h).unwrap();
    assert_eq!(frame.len(), wire::HEADER_BYTES);
    assert_eq!(wire::decode(&frame).unwrap(), h);
    let mut bad = frame.clone();
    bad[..4].copy_from_slice(&100_000u32.to_le_bytes());
    assert_eq!(
        wire::decode(&bad).unwrap_err().to_string(),
        "message header: length 100000 runs past the 4096-byte frame"
    );
    let mut bad_kind = h.clone();
    bad_kind.tensors = Some(vec![wire::Meta {
        shape: vec![2],
        kind: 99,
    }]);
    let frame = wire::encode(&bad_kind).unwrap();
    assert_eq!(
        wire::decode(&frame).unwrap_err().to_string(),
        "message header: unknown dtype code 99"
    );
    // A length claimed inside the body (a string, a list) larger than the frame is an error, not an
    // allocation of that size: bincode's varint 253 is followed by a u64.
    for claim in [u64::MAX, 1 << 40, 5000] {
        let mut body = vec![253u8];
        body.extend_from_slice(&claim.to_le_bytes());
        let mut frame = vec![0u8; wire::HEADER_BYTES];
        frame[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
        frame[4..4 + body.len()].copy_from_slice(&body);
        let err = wire::decode(&frame).unwrap_err().to_string();
        assert!(err.starts_with("message header: "), "{claim}: {err}");
    }
    let mut huge = h.clone();
    huge.trace = "x".repeat(5000);
    assert!(wire::encode(&huge)
        .unwrap_err()
        .to_string()
        .ends_with("exceeds the 4096-byte frame"));

    // On the wire: a message on the wrong edge is an error naming both edges and the peer.
    let out = on_ranks(2, Duration::from_secs(30), move |w| {
        if w.rank() == 0 {
            let mut h = h.clone();
            h.edge = "llm→diffusion".into();
            for p in wire::send(
                &w.group,
                1,
                1,
                h,
                Some(&[Tensor::ones([2], (Kind::Float, tch::Device::Cpu))]),
            )
            .unwrap()
            {
                let _ = p.wait();
            }
            String::new()
        } else {
            wire::recv(&w.group, 0, 1, "vision→llm", tch::Device::Cpu)
                .unwrap_err()
                .to_string()
        }
    });
    assert_eq!(
        out[1],
        "rank 1: message from rank 0 on vision→llm: expected a message on vision→llm, got one on llm→diffusion"
    );
}

#[test]
fn a_rank_that_never_joins_is_named_within_the_timeout() {
    let port = common::free_port();
    let started = std::time::Instant::now();
    let err = match World::join(env(0, 3, port), Duration::from_secs(2)) {
        Err(e) => e,
        Ok(_) => panic!("joined a world of 3 alone"),
    };
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        err.to_string(),
        format!("rank 0: rank(s) 1, 2 of WORLD_SIZE=3 never joined the rendezvous at 127.0.0.1:{port} within 2 s (are all 3 processes started, with the same MASTER_ADDR and MASTER_PORT?)")
    );
    // A rank whose master never comes up fails too, naming the store address.
    let port = common::free_port();
    let err = World::join(env(1, 2, port), Duration::from_secs(2))
        .err()
        .expect("joined without a master");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "rank 1: connecting to the store at 127.0.0.1:{port}: "
        )),
        "{msg}"
    );
}

#[test]
fn ranks_started_with_different_world_sizes_are_refused() {
    let port = common::free_port();
    let other = std::thread::spawn(move || {
        // Rank 1 thinks the world has 3 ranks.
        let _ = World::join(env(1, 3, port), Duration::from_secs(3));
    });
    let err = World::join(env(0, 2, port), Duration::from_secs(10))
        .err()
        .expect("joined a mismatched world");
    other.join().unwrap();
    assert_eq!(
        err.to_string(),
        "rank 0: this process has WORLD_SIZE=2 but rank 1 was started with WORLD_SIZE=3"
    );
    assert!(matches!(err, DistError::WorldMismatch { .. }));
}

#[test]
fn the_launch_contract_reads_torchrun_then_slurm() {
    let from = |vars: &[(&str, &str)]| {
        LaunchEnv::from_vars(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    };
    assert_eq!(from(&[]).unwrap(), None);
    let t = from(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29600"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(
        (
            t.rank,
            t.world_size,
            t.local_rank,
            t.local_world_size,
            t.master_addr.as_str(),
            t.master_port
        ),
        (3, 4, 1, 2, "node0", 29600)
    );
    assert_eq!(
        (t.restart_count, t.agent_store, t.source),
        (2, true, "torchrun")
    );
    let s = from(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NTASKS_PER_NODE", "4(x2)"),
        ("MASTER_ADDR", "10.0.0.1"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(
        (
            s.rank,
            s.world_size,
            s.local_rank,
            s.local_world_size,
            s.master_port,
            s.source
        ),
        (5, 8, 1, 4, 29500, "slurm")
    );
    let err = |vars: &[(&str, &str)]| from(vars).unwrap_err().to_string();
    assert_eq!(
        err(&[("RANK", "2"), ("WORLD_SIZE", "2")]),
        "RANK=\"2\": expected a rank below WORLD_SIZE=2"
    );
    assert_eq!(
        err(&[("RANK", "x"), ("WORLD_SIZE", "2")]),
        "RANK=\"x\": expected a whole number >= 0"
    );
    assert_eq!(
        err(&[("RANK", "0")]),
        "WORLD_SIZE=\"\": missing; a torchrun launch sets RANK and WORLD_SIZE together"
    );
    assert_eq!(
        err(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "99999")]),
        "MASTER_PORT=\"99999\": expected a TCP port (1-65535)"
    );
}

#[test]
fn nccl_is_built_with_its_feature_and_fails_cleanly_where_it_cannot_run() {
    assert_eq!(c10d::nccl_built(), cfg!(feature = "nccl"));
    let port = common::free_port();
    let store = Store::connect("127.0.0.1", port, true, 0, Duration::from_secs(10)).unwrap();
    let spec = GroupSpec {
        prefix: "nccl-check",
        rank: 0,
        size: 1,
        world_rank: 0,
        timeout: Duration::from_secs(10),
    };
    match Group::nccl(&store, spec) {
        Err(e) if !c10d::nccl_built() => assert_eq!(
            e.to_string(),
            "rank 0: creating the NCCL group nccl-check: this deem was built without NCCL (cargo feature `nccl`)"
        ),
        // Built in: without a GPU the constructor refuses (an error, never a crash); with one it works.
        Err(e) => assert!(
            e.to_string().starts_with("rank 0: creating the NCCL group nccl-check: "),
            "{e}"
        ),
        Ok(g) => assert!(c10d::nccl_built() && tch::Cuda::is_available() && g.size == 1),
    }
}
