//! The mesh: Megatron rank order (tp innermost, then pp, then dp) and clear layout errors.

use ondol_comm::{Coords, Direction, Mesh, ring_edges};

#[test]
fn rank_and_coords_round_trip_in_megatron_order() {
    for (tp, pp, dp) in [(1, 1, 1), (2, 1, 1), (1, 3, 1), (1, 1, 4), (2, 2, 2), (4, 2, 3), (3, 1, 2)] {
        let mesh = Mesh::new(tp, pp, dp).unwrap();
        assert_eq!(mesh.world(), tp * pp * dp);
        for rank in 0..mesh.world() {
            let c = mesh.coords(rank).unwrap();
            assert_eq!((c.dp * pp + c.pp) * tp + c.tp, rank, "{mesh:?} rank {rank}: {c:?}");
            assert_eq!(mesh.rank(c).unwrap(), rank);
            let [tp_group, pp_group, dp_group] = mesh.groups_of(rank).unwrap();
            assert_eq!((tp_group[c.tp], pp_group[c.pp], dp_group[c.dp]), (rank, rank, rank));
        }
        // Every axis's groups partition the world.
        for groups in [mesh.tp_groups(), mesh.pp_groups(), mesh.dp_groups()] {
            let mut all: Vec<usize> = groups.concat();
            all.sort();
            assert_eq!(all, (0..mesh.world()).collect::<Vec<_>>(), "{mesh:?}");
        }
    }
}

#[test]
fn tp_groups_are_contiguous_and_pp_neighbours_are_tp_apart() {
    let mesh = Mesh::new(4, 2, 3).unwrap();
    assert_eq!(mesh.tp_groups()[1], vec![4, 5, 6, 7]);
    assert_eq!(mesh.pp_groups()[0], vec![0, 4]);
    assert_eq!(mesh.dp_groups()[0], vec![0, 8, 16]);
    assert_eq!(mesh.coords(13).unwrap(), Coords { dp: 1, pp: 1, tp: 1 });
}

#[test]
fn impossible_layouts_are_clear_errors() {
    let e = Mesh::for_world(2, 2, 2, 6).unwrap_err().to_string();
    assert!(e.contains("tp 2 x pp 2 x dp 2 = 8 ranks, but the world has 6"), "{e}");
    let e = Mesh::new(2, 0, 1).unwrap_err().to_string();
    assert!(e.contains("parallelism.pp = 0"), "{e}");
    let mesh = Mesh::new(2, 1, 1).unwrap();
    assert!(mesh.coords(2).unwrap_err().to_string().contains("rank 2 is outside a mesh of 2 ranks"));
    assert!(mesh.rank(Coords { dp: 0, pp: 1, tp: 0 }).is_err());
    // Layout errors become config errors for the binary.
    let core: ondol_core::Error = Mesh::new(0, 1, 1).unwrap_err().into();
    assert!(core.to_string().starts_with("invalid value for `parallelism`"), "{core}");
}

/// The pipeline channels' links (NCCL's two-rank communicators): each rank sends on one edge,
/// to its next rank forward or its previous one backward, and receives on another, from the
/// other neighbour; both ends of an edge agree on it; and joining the edges in the order
/// given, each set-up waiting for both ends, finishes on every ring.
#[test]
fn ring_edges_pair_up_and_join_without_a_cycle() {
    for size in 2..=6 {
        for direction in [Direction::Forward, Direction::Backward] {
            let plans: Vec<_> = (0..size).map(|r| ring_edges(r, size, direction)).collect();
            for (r, plan) in plans.iter().enumerate() {
                let (next, prev) = ((r + 1) % size, (r + size - 1) % size);
                let (to, from) = if direction == Direction::Forward { (next, prev) } else { (prev, next) };
                let sends: Vec<usize> = plan.iter().filter(|e| e.sender == r).map(|e| e.receiver).collect();
                let receives: Vec<usize> = plan.iter().filter(|e| e.receiver == r).map(|e| e.sender).collect();
                assert_eq!((sends, receives), (vec![to], vec![from]), "{direction:?} rank {r} of {size}");
                for e in plan {
                    let other = if e.sender == r { e.receiver } else { e.sender };
                    assert!(plans[other].contains(e), "{direction:?}: rank {other} does not join {e:?}");
                }
            }
            let mut joined = vec![0usize; size];
            while joined.iter().any(|&j| j < 2) {
                let mut progress = false;
                for r in 0..size {
                    let Some(e) = plans[r].get(joined[r]) else { continue };
                    let other = if e.sender == r { e.receiver } else { e.sender };
                    if plans[other].get(joined[other]) == Some(e) {
                        joined[r] += 1;
                        joined[other] += 1;
                        progress = true;
                    }
                }
                assert!(progress, "{direction:?} on a ring of {size}: the set-up waits forever at {joined:?}");
            }
        }
    }
}
