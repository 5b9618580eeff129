//! The [`Communicator`] contract as tests, run against every implementation (`thread_comm.rs`,
//! `tcp_comm.rs`): every collective for world sizes 1 to 4, bit-exact (the reduction order is
//! fixed, so the expected sums are computed in the same order), sub-groups of a 2x2x2 mesh,
//! point-to-point, barriers, timeouts that name the missing rank, and clear errors for
//! mismatched calls.

use ondol_comm::{CommError, Communicator, Mesh, RankComms};
use ondol_core::{DeviceSlice, bf16};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Makes the communicators of a group, one per rank, each to be moved to a thread of its own.
pub trait Spawner: Sync {
    type C: Communicator + Send;
    fn group(&self, n: usize, timeout: Duration) -> Vec<Self::C>;
    fn mesh(&self, mesh: Mesh, timeout: Duration) -> Vec<RankComms<Self::C>>;
}

/// One `#[test]` per function of the suite, for the spawner `$s`.
#[macro_export]
macro_rules! communicator_suite {
    ($s:expr) => {
        #[test]
        fn all_reduce_is_the_rank_order_sum_bit_for_bit() {
            suite::all_reduce_is_the_rank_order_sum_bit_for_bit(&$s)
        }
        #[test]
        fn the_sum_follows_rank_order_not_arrival_order() {
            suite::the_sum_follows_rank_order_not_arrival_order(&$s)
        }
        #[test]
        fn repeated_runs_give_identical_bits() {
            suite::repeated_runs_give_identical_bits(&$s)
        }
        #[test]
        fn reduce_scatter_gives_each_rank_its_chunk_of_the_sum() {
            suite::reduce_scatter_gives_each_rank_its_chunk_of_the_sum(&$s)
        }
        #[test]
        fn reduce_leaves_the_rank_order_sum_on_the_root() {
            suite::reduce_leaves_the_rank_order_sum_on_the_root(&$s)
        }
        #[test]
        fn all_gather_concatenates_in_rank_order() {
            suite::all_gather_concatenates_in_rank_order(&$s)
        }
        #[test]
        fn broadcast_copies_the_root_buffer_for_every_root() {
            suite::broadcast_copies_the_root_buffer_for_every_root(&$s)
        }
        #[test]
        fn send_and_recv_pass_messages_around_a_ring_in_order() {
            suite::send_and_recv_pass_messages_around_a_ring_in_order(&$s)
        }
        #[test]
        fn barrier_returns_only_after_every_rank_arrived() {
            suite::barrier_returns_only_after_every_rank_arrived(&$s)
        }
        #[test]
        fn sub_groups_of_a_2x2x2_mesh_reduce_over_the_megatron_groups() {
            suite::sub_groups_of_a_2x2x2_mesh_reduce_over_the_megatron_groups(&$s)
        }
        #[test]
        fn a_rank_that_never_arrives_times_out_the_others_naming_it_and_the_op() {
            suite::a_rank_that_never_arrives_times_out_the_others_naming_it_and_the_op(&$s)
        }
        #[test]
        fn a_recv_whose_sender_never_sends_times_out_naming_it() {
            suite::a_recv_whose_sender_never_sends_times_out_naming_it(&$s)
        }
        #[test]
        fn mismatched_lengths_and_arguments_are_clear_errors() {
            suite::mismatched_lengths_and_arguments_are_clear_errors(&$s)
        }
        #[test]
        fn device_forms_work_in_place_on_host_memory_and_refuse_a_gpus() {
            suite::device_forms_work_in_place_on_host_memory_and_refuse_a_gpus(&$s)
        }
        #[test]
        fn ranks_calling_different_collectives_are_told_so() {
            suite::ranks_calling_different_collectives_are_told_so(&$s)
        }
    };
}

/// Runs `f` once per communicator, each on its own thread; results in rank order.
pub fn on_threads<C: Send, T: Send>(comms: Vec<C>, f: impl Fn(C) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Values of mixed magnitude and sign, so that a different summation order changes the bits.
pub fn data(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let v = ((rank * 7919 + i * 104_729) % 1000) as f32 + 0.123;
            let scale = 10f32.powi((i % 7) as i32 - 3 + rank as i32);
            if (i + rank).is_multiple_of(3) { -v * scale } else { v * scale }
        })
        .collect()
}

/// `((x_0 + x_1) + x_2) + ...`, elementwise.
pub fn rank_order_sum(size: usize, len: usize) -> Vec<f32> {
    let mut out = data(0, len);
    for r in 1..size {
        for (o, x) in out.iter_mut().zip(data(r, len)) {
            *o += x;
        }
    }
    out
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

pub fn all_reduce_is_the_rank_order_sum_bit_for_bit(s: &impl Spawner) {
    for size in 1..=4 {
        for len in [0, 1, 7, 13] {
            let expected = bits(&rank_order_sum(size, len));
            let got = on_threads(s.group(size, TIMEOUT), |c| {
                let mut buf = data(c.rank(), len);
                c.all_reduce_sum(&mut buf).unwrap();
                bits(&buf)
            });
            for (rank, g) in got.iter().enumerate() {
                assert_eq!(g, &expected, "size {size} len {len} rank {rank}");
            }
        }
    }
}

pub fn the_sum_follows_rank_order_not_arrival_order(s: &impl Spawner) {
    // In f32, (1e8 + 1) - 1e8 + 1 = 1 but 1e8 - 1e8 + 1 + 1 = 2; rank 0 arrives last.
    let inputs = [1e8f32, 1.0, -1e8, 1.0];
    let got = on_threads(s.group(4, TIMEOUT), |c| {
        if c.rank() == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut buf = [inputs[c.rank()]];
        c.all_reduce_sum(&mut buf).unwrap();
        buf[0]
    });
    assert_eq!(got, vec![1.0; 4]);
}

pub fn repeated_runs_give_identical_bits(s: &impl Spawner) {
    let run = || {
        on_threads(s.group(4, TIMEOUT), |c| {
            let mut buf = data(c.rank(), 1001);
            for _ in 0..3 {
                c.all_reduce_sum(&mut buf).unwrap();
            }
            let mut out = vec![0.0; 250];
            c.reduce_scatter_sum(&buf[..1000], &mut out).unwrap();
            (bits(&buf), bits(&out))
        })
    };
    let first = run();
    for rank in 1..4 {
        assert_eq!(first[rank].0, first[0].0, "ranks disagree");
    }
    for _ in 0..5 {
        assert_eq!(run(), first);
    }
}

pub fn reduce_scatter_gives_each_rank_its_chunk_of_the_sum(s: &impl Spawner) {
    for size in 1..=4 {
        for chunk in [1, 5] {
            let sum = rank_order_sum(size, size * chunk);
            let got = on_threads(s.group(size, TIMEOUT), |c| {
                let mut out = vec![0.0; chunk];
                c.reduce_scatter_sum(&data(c.rank(), size * chunk), &mut out).unwrap();
                out
            });
            for (rank, g) in got.iter().enumerate() {
                assert_eq!(bits(g), bits(&sum[rank * chunk..(rank + 1) * chunk]), "size {size} rank {rank}");
            }
        }
    }
}

/// The root's buffer becomes the sum; the others keep theirs (the contract leaves them
/// unspecified; both host communicators leave them as they were).
pub fn reduce_leaves_the_rank_order_sum_on_the_root(s: &impl Spawner) {
    for size in 1..=4 {
        let sum = rank_order_sum(size, 7);
        for root in 0..size {
            let got = on_threads(s.group(size, TIMEOUT), |c| {
                let mut buf = data(c.rank(), 7);
                c.reduce_sum(&mut buf, root).unwrap();
                buf
            });
            for (rank, g) in got.iter().enumerate() {
                let own = data(rank, 7);
                let want = if rank == root { &sum } else { &own };
                assert_eq!(bits(g), bits(want), "size {size} root {root}: rank {rank}");
            }
        }
    }
    let c = s.group(1, TIMEOUT).pop().unwrap();
    let err = c.reduce_sum(&mut [1.0], 1).unwrap_err().to_string();
    assert!(err.contains("root 1"), "{err}");
}

pub fn all_gather_concatenates_in_rank_order(s: &impl Spawner) {
    for size in 1..=4 {
        let expected: Vec<f32> = (0..size).flat_map(|r| data(r, 3)).collect();
        let got = on_threads(s.group(size, TIMEOUT), |c| {
            let mut out = vec![0.0; size * 3];
            c.all_gather(&data(c.rank(), 3), &mut out).unwrap();
            out
        });
        assert!(got.iter().all(|g| bits(g) == bits(&expected)), "size {size}");
    }
}

pub fn broadcast_copies_the_root_buffer_for_every_root(s: &impl Spawner) {
    for size in 1..=4 {
        for root in 0..size {
            let got = on_threads(s.group(size, TIMEOUT), |c| {
                let mut buf = data(c.rank(), 9);
                c.broadcast(&mut buf, root).unwrap();
                buf
            });
            assert!(got.iter().all(|g| bits(g) == bits(&data(root, 9))), "size {size} root {root}");
        }
    }
}

pub fn send_and_recv_pass_messages_around_a_ring_in_order(s: &impl Spawner) {
    for size in 2..=4 {
        let got = on_threads(s.group(size, TIMEOUT), |c| {
            let (next, prev) = ((c.rank() + 1) % size, (c.rank() + size - 1) % size);
            for k in 0..3 {
                c.send(&[c.rank() as f32, k as f32], next).unwrap();
            }
            (0..3)
                .map(|_| {
                    let mut buf = [0.0; 2];
                    c.recv(&mut buf, prev).unwrap();
                    buf
                })
                .collect::<Vec<_>>()
        });
        for (rank, msgs) in got.iter().enumerate() {
            let prev = ((rank + size - 1) % size) as f32;
            assert_eq!(msgs, &vec![[prev, 0.0], [prev, 1.0], [prev, 2.0]], "size {size} rank {rank}");
        }
    }
}

pub fn barrier_returns_only_after_every_rank_arrived(s: &impl Spawner) {
    let arrived = AtomicUsize::new(0);
    on_threads(s.group(4, TIMEOUT), |c| {
        for round in 1..=3 {
            if c.rank() == round {
                std::thread::sleep(Duration::from_millis(20));
            }
            arrived.fetch_add(1, Ordering::SeqCst);
            c.barrier().unwrap();
            assert!(arrived.load(Ordering::SeqCst) >= 4 * round, "rank {} left barrier {round} early", c.rank());
            c.barrier().unwrap();
        }
    });
}

pub fn sub_groups_of_a_2x2x2_mesh_reduce_over_the_megatron_groups(s: &impl Spawner) {
    let mesh = Mesh::for_world(2, 2, 2, 8).unwrap();
    assert_eq!(mesh.tp_groups(), vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
    assert_eq!(mesh.pp_groups(), vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]);
    assert_eq!(mesh.dp_groups(), vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
    let got = on_threads(s.mesh(mesh, TIMEOUT), |rc| {
        let r = rc.rank() as f32;
        assert_eq!((rc.tp.rank(), rc.pp.rank(), rc.dp.rank()), (rc.coords.tp, rc.coords.pp, rc.coords.dp));
        assert_eq!(rc.tp.size() * rc.pp.size() * rc.dp.size(), rc.world.size());
        let mut sums = [[r], [r], [r], [r]];
        // Different groups interleave on different threads; each group orders its own ops.
        rc.tp.all_reduce_sum(&mut sums[0]).unwrap();
        rc.pp.all_reduce_sum(&mut sums[1]).unwrap();
        rc.dp.all_reduce_sum(&mut sums[2]).unwrap();
        rc.world.all_reduce_sum(&mut sums[3]).unwrap();
        let mut gathered = [0.0; 2];
        rc.pp.all_gather(&[r], &mut gathered).unwrap();
        (sums.map(|s| s[0]), gathered, rc.world.world_ranks().len(), rc.dp.world_ranks().to_vec())
    });
    for (rank, (sums, gathered, world, dp_members)) in got.into_iter().enumerate() {
        let group_sum = |groups: Vec<Vec<usize>>| {
            groups.into_iter().find(|g| g.contains(&rank)).unwrap().iter().sum::<usize>() as f32
        };
        assert_eq!(sums, [group_sum(mesh.tp_groups()), group_sum(mesh.pp_groups()), group_sum(mesh.dp_groups()), 28.0]);
        let pp = mesh.pp_groups().into_iter().find(|g| g.contains(&rank)).unwrap();
        assert_eq!(gathered, [pp[0] as f32, pp[1] as f32]);
        assert_eq!(world, 8);
        assert_eq!(dp_members, vec![rank % 4, rank % 4 + 4]);
    }
}

pub fn a_rank_that_never_arrives_times_out_the_others_naming_it_and_the_op(s: &impl Spawner) {
    // Long enough that "at once" below cannot be mistaken for a wait on a loaded machine.
    let timeout = Duration::from_millis(2000);
    let mut comms = s.group(3, timeout);
    let late = comms.pop().unwrap();
    let start = Instant::now();
    let errors = on_threads(comms, |c| {
        let mut buf = [1.0f32; 4];
        c.all_reduce_sum(&mut buf).unwrap_err()
    });
    assert!(start.elapsed() < Duration::from_secs(8), "took {:?}", start.elapsed());
    for e in &errors {
        let CommError::Timeout(info) = e else { panic!("not a timeout: {e}") };
        assert_eq!(
            (info.op, info.missing.as_slice(), info.group.as_slice()),
            ("all_reduce_sum", &[2][..], &[0, 1, 2][..])
        );
        let msg = e.to_string();
        assert!(
            msg.contains("all_reduce_sum") && msg.contains("rank 2 did not arrive") && msg.contains("[0, 1, 2]"),
            "{msg}"
        );
    }
    // The group is broken: the late rank fails at once instead of waiting for the others.
    let start = Instant::now();
    let e = late.barrier().unwrap_err();
    assert!(start.elapsed() < timeout / 2, "took {:?}: {e}", start.elapsed());
    assert!(matches!(e, CommError::Broken { .. }) && e.to_string().contains("all_reduce_sum timed out"), "{e}");
}

pub fn a_recv_whose_sender_never_sends_times_out_naming_it(s: &impl Spawner) {
    let comms = s.group(2, Duration::from_millis(200));
    let mut buf = [0.0f32; 3];
    let e = comms[1].recv(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("recv timed out") && e.to_string().contains("rank 0 did not arrive"), "{e}");
}

pub fn mismatched_lengths_and_arguments_are_clear_errors(s: &impl Spawner) {
    let errors = on_threads(s.group(2, TIMEOUT), |c| {
        let mut buf = vec![0.0f32; 3 + c.rank()];
        c.all_reduce_sum(&mut buf).unwrap_err().to_string()
    });
    for e in &errors {
        assert!(e.contains("buffer lengths differ across ranks (rank 0: 3, rank 1: 4)"), "{e}");
    }
    let c = s.group(2, TIMEOUT).remove(0);
    let e = c.reduce_scatter_sum(&[0.0; 5], &mut [0.0; 2]).unwrap_err().to_string();
    assert!(e.contains("input has 5 elements; it must be size 2 x output 2"), "{e}");
    let e = c.broadcast(&mut [0.0], 2).unwrap_err().to_string();
    assert!(e.contains("root 2 is outside the group of 2 ranks"), "{e}");
    let e = c.send(&[0.0], 5).unwrap_err().to_string();
    assert!(e.contains("destination 5 is outside"), "{e}");
}

pub fn ranks_calling_different_collectives_are_told_so(s: &impl Spawner) {
    let results = on_threads(s.group(2, Duration::from_millis(300)), |c| {
        if c.rank() == 0 { c.barrier() } else { c.all_reduce_sum(&mut [1.0]) }
    });
    // A rank that sees the other in a different collective is refused at once (ThreadComm: the
    // second to arrive; TcpComm: both, from each other's messages); none succeeds.
    let invalid: Vec<String> = results
        .iter()
        .filter_map(|r| match r {
            Err(e @ CommError::Invalid { .. }) => Some(e.to_string()),
            _ => None,
        })
        .collect();
    assert!(!invalid.is_empty() && results.iter().all(Result::is_err), "{results:?}");
    for e in &invalid {
        assert!(e.contains("barrier") && e.contains("all_reduce_sum"), "{e}");
    }
}

/// The `*_device` forms on a device emulated in host memory (`DeviceSlice::host`): f32 sums
/// bit for bit as the host forms give them, bf16 rounded once; reduce-scatter and all-gather in
/// place (the shard a view of the whole buffer, as ZeRO-1 uses them); queued sums done by
/// `wait_queued`. A GPU's slice is refused with a clear error, not dereferenced.
pub fn device_forms_work_in_place_on_host_memory_and_refuse_a_gpus(s: &impl Spawner) {
    let size = 3;
    let slice = |v: &mut [f32]| DeviceSlice { ptr: v.as_mut_ptr() as u64, len: v.len(), bf16: false, host: true };
    let expected = bits(&rank_order_sum(size, 12));
    let got = on_threads(s.group(size, TIMEOUT), |c| {
        let mut buf = data(c.rank(), 12);
        assert!(c.takes(&slice(&mut buf)));
        c.queue_all_reduce_device(slice(&mut buf)).unwrap();
        c.wait_queued().unwrap();
        let summed = bits(&buf);
        // In place: this rank's quarter of `whole` becomes its chunk of the sum, then every
        // rank's chunk is gathered back into `whole`.
        let mut whole = data(c.rank(), 12);
        let mine = DeviceSlice { ptr: slice(&mut whole).ptr + 16 * c.rank() as u64, len: 4, ..slice(&mut whole) };
        c.reduce_scatter_device(slice(&mut whole), mine).unwrap();
        c.all_gather_device(mine, slice(&mut whole)).unwrap();
        // bf16: the sum of the rounded values, rounded once.
        let mut halves: Vec<u16> = data(c.rank(), 5).iter().map(|&x| bf16::from_f32(x)).collect();
        let half = DeviceSlice { ptr: halves.as_mut_ptr() as u64, len: 5, bf16: true, host: true };
        c.all_reduce_device(half).unwrap();
        let gpu = DeviceSlice { host: false, ..slice(&mut buf) };
        let refused = c.all_reduce_device(gpu).unwrap_err().to_string();
        (summed, bits(&whole), halves, c.takes(&gpu), refused)
    });
    let rounded = |r: usize| -> Vec<f32> { data(r, 5).iter().map(|&x| bf16::to_f32(bf16::from_f32(x))).collect() };
    let mut half_sum = rounded(0);
    for r in 1..size {
        half_sum.iter_mut().zip(rounded(r)).for_each(|(a, b)| *a += b);
    }
    let half_expected: Vec<u16> = half_sum.iter().map(|&x| bf16::from_f32(x)).collect();
    for (rank, (summed, whole, halves, takes_gpu, refused)) in got.iter().enumerate() {
        assert_eq!(summed, &expected, "rank {rank}: queued all-reduce");
        assert_eq!(whole, &expected, "rank {rank}: reduce-scatter then all-gather in place");
        assert_eq!(halves, &half_expected, "rank {rank}: bf16 all-reduce");
        assert!(!takes_gpu, "rank {rank} takes a GPU's slice");
        assert!(refused.contains("host memory only"), "rank {rank}: {refused}");
    }
}
