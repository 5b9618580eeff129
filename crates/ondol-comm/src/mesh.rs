//! The device mesh: how world ranks map to (dp, pp, tp) coordinates, which ranks form each
//! group, and [`RankComms`], the one type that owns every communicator of a rank (Megatron's
//! `parallel_state`, as a value instead of globals).
//!
//! Order follows Megatron: tp is innermost, then pp, then dp, so
//! `rank = (dp_i * pp + pp_i) * tp + tp_i`. A tp group is `tp` consecutive ranks, which keeps the
//! chattiest traffic (two all-reduces per layer) on one node's fast links; pp neighbours are `tp`
//! ranks apart; dp replicas are `tp * pp` ranks apart.

use crate::comm::Communicator;
use crate::error::CommError;
use crate::thread::ThreadComm;
use std::time::Duration;

/// A parallel layout: tensor, pipeline and data parallel degrees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mesh {
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
}

/// A rank's position in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coords {
    pub dp: usize,
    pub pp: usize,
    pub tp: usize,
}

impl Mesh {
    /// A mesh of `tp * pp * dp` ranks; every degree must be at least 1.
    pub fn new(tp: usize, pp: usize, dp: usize) -> Result<Mesh, CommError> {
        for (name, v) in [("tp", tp), ("pp", pp), ("dp", dp)] {
            if v == 0 {
                return Err(CommError::Layout(format!("parallelism.{name} = 0; every degree must be at least 1")));
            }
        }
        tp.checked_mul(pp)
            .and_then(|x| x.checked_mul(dp))
            .ok_or_else(|| CommError::Layout(format!("tp {tp} x pp {pp} x dp {dp} overflows")))?;
        Ok(Mesh { tp, pp, dp })
    }

    /// A mesh that must cover exactly `world` ranks (the launched processes or threads).
    pub fn for_world(tp: usize, pp: usize, dp: usize, world: usize) -> Result<Mesh, CommError> {
        let mesh = Mesh::new(tp, pp, dp)?;
        if mesh.world() != world {
            return Err(CommError::Layout(format!(
                "tp {tp} x pp {pp} x dp {dp} = {} ranks, but the world has {world}; choose degrees whose \
                 product is {world}",
                mesh.world()
            )));
        }
        Ok(mesh)
    }

    pub fn world(&self) -> usize {
        self.tp * self.pp * self.dp
    }

    /// The coordinates of `rank`, or an error if the mesh has no such rank.
    pub fn coords(&self, rank: usize) -> Result<Coords, CommError> {
        if rank >= self.world() {
            return Err(CommError::Layout(format!("rank {rank} is outside a mesh of {} ranks", self.world())));
        }
        Ok(Coords { tp: rank % self.tp, pp: rank / self.tp % self.pp, dp: rank / (self.tp * self.pp) })
    }

    /// The rank at `c`, or an error if a coordinate is out of range.
    pub fn rank(&self, c: Coords) -> Result<usize, CommError> {
        if c.tp >= self.tp || c.pp >= self.pp || c.dp >= self.dp {
            return Err(CommError::Layout(format!("coordinates {c:?} are outside the mesh {self:?}")));
        }
        Ok((c.dp * self.pp + c.pp) * self.tp + c.tp)
    }

    /// Every tp group: ranks that share (dp, pp), in tp order.
    pub fn tp_groups(&self) -> Vec<Vec<usize>> {
        self.groups(|m, fixed, i| Coords { dp: fixed / m.pp, pp: fixed % m.pp, tp: i }, self.dp * self.pp, self.tp)
    }

    /// Every pp group: ranks that share (dp, tp), in stage order.
    pub fn pp_groups(&self) -> Vec<Vec<usize>> {
        self.groups(|m, fixed, i| Coords { dp: fixed / m.tp, pp: i, tp: fixed % m.tp }, self.dp * self.tp, self.pp)
    }

    /// Every dp group: ranks that share (pp, tp), in replica order.
    pub fn dp_groups(&self) -> Vec<Vec<usize>> {
        self.groups(|m, fixed, i| Coords { dp: i, pp: fixed / m.tp, tp: fixed % m.tp }, self.pp * self.tp, self.dp)
    }

    /// `count` groups of `len` ranks; `at(mesh, group, i)` gives the coordinates of member `i`.
    fn groups(&self, at: impl Fn(&Mesh, usize, usize) -> Coords, count: usize, len: usize) -> Vec<Vec<usize>> {
        (0..count)
            .map(|g| {
                (0..len)
                    .map(|i| {
                        let c = at(self, g, i);
                        (c.dp * self.pp + c.pp) * self.tp + c.tp
                    })
                    .collect()
            })
            .collect()
    }

    /// The tp, pp and dp groups containing `rank`.
    pub fn groups_of(&self, rank: usize) -> Result<[Vec<usize>; 3], CommError> {
        self.coords(rank)?;
        let find = |groups: Vec<Vec<usize>>| groups.into_iter().find(|g| g.contains(&rank)).unwrap_or_default();
        Ok([find(self.tp_groups()), find(self.pp_groups()), find(self.dp_groups())])
    }
}

/// Which way a pipeline channel carries messages around the ring of pipeline ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// To the next rank, from the previous one (activations; [`RankComms::pp`]).
    Forward,
    /// To the previous rank, from the next one (gradients; [`RankComms::pp_back`]).
    Backward,
}

/// A one-way link between two neighbours of a ring of pipeline ranks, in group ranks: edge
/// `index` joins ranks `index` and `index + 1` (mod the ring's size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingEdge {
    pub index: usize,
    pub sender: usize,
    pub receiver: usize,
}

/// The two edges group rank `rank` of a ring of `size >= 2` ranks is on for `direction`:
/// the one it sends on and the one it receives on, in ascending index. Joining them in this
/// order on every rank (as NCCL's communicator set-up, which waits for both ends, needs)
/// lets edge 0 start, then each edge after the one before: no cycle of ranks waits on itself.
pub fn ring_edges(rank: usize, size: usize, direction: Direction) -> [RingEdge; 2] {
    assert!(size >= 2 && rank < size, "rank {rank} of a ring of {size}");
    let edge = |index: usize| {
        let (low, high) = (index, (index + 1) % size);
        match direction {
            Direction::Forward => RingEdge { index, sender: low, receiver: high },
            Direction::Backward => RingEdge { index, sender: high, receiver: low },
        }
    };
    let (mine, before) = (edge(rank), edge((rank + size - 1) % size));
    if mine.index < before.index { [mine, before] } else { [before, mine] }
}

/// Every communicator of one rank: the world and its tp, pp and dp groups. A rank's position in
/// a group is its coordinate along that axis (`tp.rank() == coords.tp`, ...).
pub struct RankComms<C: Communicator> {
    pub mesh: Mesh,
    pub coords: Coords,
    pub world: C,
    pub tp: C,
    /// The pipeline group, twice: activations flow forward on `pp` (each rank sends to the
    /// next around the ring of stages and receives from the one before) and gradients back on
    /// `pp_back` (to the one before, from the next), so the two streams between the same two
    /// ranks never interleave (point-to-point messages between a pair arrive in the order they
    /// were sent). Their sends are buffered, returning before the receive is posted, which
    /// the schedules rely on: the thread and TCP communicators always buffer, and NCCL's
    /// pipeline channels (`NcclPipe`, feature `nccl`) copy each message to send it later.
    pub pp: C,
    pub pp_back: C,
    pub dp: C,
}

impl<C: Communicator> RankComms<C> {
    /// This rank's index in the world.
    pub fn rank(&self) -> usize {
        self.world.rank()
    }
}

impl<C: Communicator + 'static> RankComms<C> {
    /// The same communicators behind `dyn Communicator`, for code that does not care which
    /// implementation carries them.
    pub fn boxed(self) -> RankComms<Box<dyn Communicator>> {
        RankComms {
            mesh: self.mesh,
            coords: self.coords,
            world: Box::new(self.world),
            tp: Box::new(self.tp),
            pp: Box::new(self.pp),
            pp_back: Box::new(self.pp_back),
            dp: Box::new(self.dp),
        }
    }
}

impl RankComms<ThreadComm> {
    /// The communicators of every rank of `mesh` as threads of this process, indexed by rank;
    /// move one into each rank's thread. Every operation waits at most `timeout`.
    pub fn threads(mesh: Mesh, timeout: Duration) -> Result<Vec<RankComms<ThreadComm>>, CommError> {
        let n = mesh.world();
        let world = ThreadComm::group(n, timeout);
        let tp = ThreadComm::partition(n, &mesh.tp_groups(), timeout)?;
        let pp = ThreadComm::partition(n, &mesh.pp_groups(), timeout)?;
        let pp_back = ThreadComm::partition(n, &mesh.pp_groups(), timeout)?;
        let dp = ThreadComm::partition(n, &mesh.dp_groups(), timeout)?;
        world
            .into_iter()
            .zip(tp)
            .zip(pp.into_iter().zip(pp_back))
            .zip(dp)
            .enumerate()
            .map(|(rank, (((world, tp), (pp, pp_back)), dp))| {
                Ok(RankComms { mesh, coords: mesh.coords(rank)?, world, tp, pp, pp_back, dp })
            })
            .collect()
    }
}
