//! The mesh: Megatron rank order (tp innermost, then pp, then dp) and clear layout errors.

use ondol_comm::{Coords, Mesh};

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
