//! NcclComm on GPU 0 at world size 1 (a machine with one GPU can run no more ranks): every
//! collective on host slices and on device memory, f32 and bf16, through the same rendezvous
//! as a launched job. Multi-GPU results are what the thread-rank layout tests establish; the
//! NCCL calls are the same. Skips with a message without a GPU or libnccl, unless
//! ONDOL_REQUIRE_GPU is set (the GPU bundle sets it).
#![cfg(feature = "nccl")]

use cudarc::driver::{CudaContext, DevicePtr};
use ondol_comm::nccl::nccl_available;
use ondol_comm::{Communicator, Mesh, RankComms, StoreClient, StoreServer};
use ondol_core::DeviceSlice;
use std::time::Duration;

#[test]
fn every_collective_runs_at_world_size_one() {
    // SAFETY: only tries to dlopen the driver.
    let gpu = unsafe { cudarc::driver::sys::is_culib_present() } && CudaContext::device_count().is_ok_and(|n| n > 0);
    if !gpu || !nccl_available() {
        assert!(
            std::env::var_os("ONDOL_REQUIRE_GPU").is_none(),
            "ONDOL_REQUIRE_GPU is set: GPU {gpu}, NCCL {}",
            nccl_available()
        );
        eprintln!("skipped: GPU {gpu}, libnccl {}", nccl_available());
        return;
    }
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    let server = StoreServer::bind("127.0.0.1:0").unwrap();
    let mut store = StoreClient::connect(&server.addr().to_string(), 0, Duration::from_secs(10)).unwrap();
    let mesh = Mesh::new(1, 1, 1).unwrap();
    let comms = RankComms::nccl(mesh, 0, &mut store, &stream, Duration::from_secs(30)).unwrap();
    for comm in [&comms.world, &comms.tp, &comms.dp] {
        let mut buf = [1.5f32, -2.0, 3.25];
        comm.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(buf, [1.5, -2.0, 3.25]);
        let mut out = [0.0f32; 3];
        comm.all_gather(&buf, &mut out).unwrap();
        assert_eq!(out, buf);
        comm.reduce_scatter_sum(&buf, &mut out).unwrap();
        assert_eq!(out, buf);
        comm.reduce_sum(&mut out, 0).unwrap();
        assert_eq!(out, buf);
        let mut b = [7.0f32];
        comm.broadcast(&mut b, 0).unwrap();
        assert_eq!(b, [7.0]);
        comm.barrier().unwrap();
    }
    // Device memory, f32 and bf16 (1.5 and -2.0 are exact in bf16: 0x3fc0, 0xc000).
    let f32s = stream.clone_htod(&[1.5f32, -2.0, 3.25, 4.0]).unwrap();
    let out = stream.alloc_zeros::<f32>(4).unwrap();
    let (in_ptr, out_ptr) = (f32s.device_ptr(&stream).0, out.device_ptr(&stream).0);
    let slice = |ptr, len, bf16| DeviceSlice { ptr, len, bf16, host: false };
    assert!(
        comms.dp.takes(&slice(in_ptr, 4, false))
            && !comms.dp.takes(&DeviceSlice { host: true, ..slice(in_ptr, 4, false) })
    );
    comms.dp.all_reduce_device(slice(in_ptr, 4, false)).unwrap();
    comms.tp.all_gather_device(slice(in_ptr, 4, false), slice(out_ptr, 4, false)).unwrap();
    assert_eq!(stream.clone_dtoh(&out).unwrap(), vec![1.5, -2.0, 3.25, 4.0]);
    let bf16s = stream.clone_htod(&[0x3fc0u16, 0xc000]).unwrap();
    let bf16_ptr = bf16s.device_ptr(&stream).0;
    comms.tp.all_reduce_device(slice(bf16_ptr, 2, true)).unwrap();
    comms.tp.reduce_scatter_device(slice(bf16_ptr, 2, true), slice(bf16_ptr, 2, true)).unwrap();
    assert_eq!(stream.clone_dtoh(&bf16s).unwrap(), vec![0x3fc0, 0xc000]);
    // The dp group's side lane (gradient buckets beside backward): queued twice, waited once.
    comms.dp.wait_queued().unwrap();
    comms.dp.queue_all_reduce_device(slice(in_ptr, 2, false)).unwrap();
    comms.dp.queue_all_reduce_device(slice(bf16_ptr, 2, true)).unwrap();
    comms.dp.queue_reduce_device(slice(in_ptr, 4, false), 0).unwrap();
    comms.dp.wait_queued().unwrap();
    comms.dp.reduce_device(slice(bf16_ptr, 2, true), 0).unwrap();
    assert!(comms.dp.reduce_device(slice(in_ptr, 4, false), 1).is_err(), "root 1 of a group of 1");
    assert_eq!(stream.clone_dtoh(&f32s).unwrap(), vec![1.5, -2.0, 3.25, 4.0]);
    assert_eq!(stream.clone_dtoh(&bf16s).unwrap(), vec![0x3fc0, 0xc000]);
    drop(comms);
    drop(store);
    server.shutdown(Duration::from_secs(1));
}
