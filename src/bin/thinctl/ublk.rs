//! Local block devices over ublk (`/dev/ublkbN`), served by `thinctl serve`.
//!
//! Each attached device gets one thread that runs `libublk`'s control side (ADD_DEV,
//! SET_PARAMS, START_DEV through `/dev/ublk-control`) and one thread per queue (one
//! queue per CPU, at most [`MAX_QUEUES`]) that serves the kernel's requests with
//! io_uring, one at a time: every request is executed by
//! [`serve_request`] on the device's [`Export`], opened through the server's
//! [`PoolCatalog`] exactly as an NBD connection opens it. So reads, writes, discards,
//! write-zeroes and flushes are the same `Service` calls as NBD's (FLUSH and FUA
//! writes join the same group commit), errors map through the same
//! `thinpool::nbd::errno` (a full pool is `-ENOSPC`, never a crash), and the export
//! holds the device's attach count for as long as the ublk device exists.
//!
//! No `unsafe` here: `libublk` owns the io_uring rings, the mmap'ed request
//! descriptors and the I/O buffers (which the kernel copies request data into and
//! out of) and hands them to us as slices.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkFlags, UblkIORes};
use thinpool::nbd::export::errno;
use thinpool::nbd::{Catalog, Export, ExportError};
use thinpool::server::exports::PoolCatalog;
use thinpool::server::local::{LocalDevice, LocalDevices};
use thinpool::server::protocol::{ControlError, ErrorKind};

/// The ublk control device the kernel module creates.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";

/// Requests in flight per queue (the queue depth).
const QUEUE_DEPTH: u16 = 64;
/// At most this many queues (one thread each) per device.
const MAX_QUEUES: usize = 4;
/// Largest request (the kernel splits bigger ones): 512 KiB.
const IO_BUF_BYTES: u32 = 512 << 10;
/// How long attach waits for the kernel to start a device, and detach for it to go.
const WAIT: Duration = Duration::from_secs(20);

/// Why ublk is not available here, when it is not: `/dev/ublk-control` is missing.
/// (`THINCTL_UBLK_CONTROL` names another path to look for, so tests can see this
/// error on any host.)
pub fn unavailable() -> Option<String> {
    let control =
        std::env::var_os("THINCTL_UBLK_CONTROL").map_or_else(|| UBLK_CONTROL.into(), std::path::PathBuf::from);
    if control.exists() {
        return None;
    }
    Some(format!(
        "{} does not exist: this kernel has no ublk driver loaded; it needs \
         CONFIG_BLK_DEV_UBLK (Linux 6.0 or later) and, when built as a module, `modprobe ublk_drv`",
        control.display()
    ))
}

/// Execute one ublk request on `export` with the request's data in `buf`; the
/// result the kernel gets: bytes done for reads and writes, 0 for the others, or a
/// negative errno (the same errno NBD clients get for the same failure).
pub fn serve_request(
    export: &dyn Export,
    read_only: bool,
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    buf: &mut [u8],
) -> i32 {
    let op = op_flags & 0xff;
    let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
    if op == sys::UBLK_IO_OP_FLUSH {
        // A flush has no range (its sector is all ones).
        return export.flush().map_or_else(|e| -i32::try_from(errno(&e)).unwrap_or(libc::EIO), |()| 0);
    }
    let offset = start_sector.checked_mul(512);
    let len = u64::from(nr_sectors) * 512;
    let Some(offset) = offset.filter(|o| o.checked_add(len).is_some_and(|end| end <= export.size())) else {
        return -libc::EINVAL;
    };
    let writes = matches!(op, sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES);
    if writes && read_only {
        return -libc::EROFS;
    }
    let data = |buf: &mut [u8]| -> Result<usize, ExportError> {
        usize::try_from(len)
            .ok()
            .filter(|&n| n <= buf.len())
            .ok_or_else(|| ExportError::Invalid(format!("a request of {len} bytes is over the I/O buffer")))
    };
    let r = match op {
        sys::UBLK_IO_OP_READ => data(buf).and_then(|n| export.read(offset, &mut buf[..n]).map(|()| n)),
        sys::UBLK_IO_OP_WRITE => data(buf).and_then(|n| export.write(offset, &buf[..n]).map(|()| n)),
        sys::UBLK_IO_OP_DISCARD => export.trim(offset, len).map(|()| 0),
        sys::UBLK_IO_OP_WRITE_ZEROES => {
            export.write_zeroes(offset, len, op_flags & sys::UBLK_IO_F_NOUNMAP == 0, false).map(|()| 0)
        }
        _ => Err(ExportError::NotSupported),
    };
    // FUA: the write is durable before it completes (a commit, as NBD's FUA).
    let r = r.and_then(|n| if fua && writes { export.flush().map(|()| n) } else { Ok(n) });
    match r {
        Ok(n) => i32::try_from(n).unwrap_or(-libc::EINVAL),
        Err(e) => -i32::try_from(errno(&e)).unwrap_or(libc::EIO),
    }
}

/// One attached device.
struct Attached {
    device: LocalDevice,
    thread: JoinHandle<()>,
}

/// The ublk devices of a server.
pub struct Ublk {
    /// The pool directory (canonical), recorded with each device so that a server
    /// restarted after a crash finds its devices.
    pool: String,
    /// The server's exports (set once serving starts).
    catalog: Arc<OnceLock<Arc<PoolCatalog>>>,
    devices: Mutex<BTreeMap<String, Attached>>,
    /// Attaches and detaches run one at a time.
    busy: Mutex<()>,
}

fn failed(message: impl Into<String>) -> ControlError {
    ControlError::new(ErrorKind::Failed, message)
}

impl Ublk {
    /// Devices of the pool in `pool_dir` served from `catalog`'s exports, once it is set.
    pub fn new(pool_dir: &std::path::Path, catalog: Arc<OnceLock<Arc<PoolCatalog>>>) -> Arc<Ublk> {
        let pool = std::fs::canonicalize(pool_dir).unwrap_or_else(|_| pool_dir.to_path_buf());
        Arc::new(Ublk {
            pool: pool.to_string_lossy().into_owned(),
            catalog,
            devices: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(()),
        })
    }

    /// Take over the devices a server of this pool left when it died (ublk user
    /// recovery): every ublk device the kernel holds quiesced whose recorded pool is
    /// ours is served again, under the same /dev/ublkbN, and I/O waiting on it
    /// resumes. Returns them.
    pub fn recover(&self) -> Vec<Result<LocalDevice, ControlError>> {
        if unavailable().is_some() {
            return Vec::new();
        }
        let Ok(dir) = std::fs::read_dir("/sys/class/ublk-char") else { return Vec::new() };
        let mut ids: Vec<u32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("ublkc")?.parse().ok()))
            .collect();
        ids.sort_unstable();
        let mut out = Vec::new();
        for id in ids {
            let Ok(ctrl) = UblkCtrl::new_simple(id as i32) else { continue };
            if u32::from(ctrl.dev_info().state) != sys::UBLK_S_DEV_QUIESCED {
                continue;
            }
            let Some(data) = ctrl.get_target_data_from_json() else { continue };
            let Ok(target) = serde_json::from_value::<Target>(data) else { continue };
            if target.pool != self.pool {
                continue;
            }
            let r = self.start(&target.name, target.read_only, Some((id, &ctrl)));
            if matches!(&r, Err(e) if e.kind == ErrorKind::NoSuchDevice) {
                // Its thin device is gone (deleted while no server ran): nothing can
                // serve it again, so it is removed rather than left waiting.
                let _ = ctrl.del_dev();
            }
            out.push(r.map_err(|e| failed(format!("/dev/ublkb{id}: {}", e.message))));
        }
        out
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Attached>> {
        self.devices.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remove every device (on shutdown).
    pub fn detach_all(&self) {
        let names: Vec<String> = self.devices().keys().cloned().collect();
        for name in names {
            if let Err(e) = self.detach(&name) {
                eprintln!("thinctl serve: {e}");
            }
        }
    }
}

/// What a device records about itself (libublk's target data, in
/// `/run/ublksrvd/N.json`): enough for a restarted server to recover it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Target {
    pool: String,
    name: String,
    read_only: bool,
}

impl Ublk {
    /// Add (or, with `recover`, take over) and start the device of `name`.
    fn start(
        &self,
        name: &str,
        read_only: bool,
        recover: Option<(u32, &UblkCtrl)>,
    ) -> Result<LocalDevice, ControlError> {
        let _one = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = unavailable() {
            return Err(failed(why));
        }
        if let Some(a) = self.devices().get(name) {
            return Err(failed(format!("device \"{name}\" is attached already, as {}", a.device.path)));
        }
        let catalog = self.catalog.get().ok_or_else(|| failed("the server is not serving yet"))?;
        let export = catalog
            .open(name)
            .filter(|_| !name.is_empty())
            .ok_or_else(|| ControlError::new(ErrorKind::NoSuchDevice, format!("no device \"{name}\" is served")))?;
        let read_only = read_only || export.read_only();
        let target = Target { pool: self.pool.clone(), name: name.to_string(), read_only };
        let recover_id = match recover {
            Some((id, ctrl)) => {
                // START_USER_RECOVERY: the kernel lets a new server fetch requests.
                ctrl.start_user_recover()
                    .map_err(|e| failed(format!("cannot recover /dev/ublkb{id} for \"{name}\": {e}")))?;
                Some(id)
            }
            None => None,
        };
        let (tx, rx) = mpsc::channel::<Result<u32, String>>();
        let thread_name = format!("ublk-{name}");
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || run_device(export, target, recover_id, tx))
            .map_err(|e| failed(format!("cannot start the ublk thread: {e}")))?;
        let dev_id = match rx.recv_timeout(WAIT) {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(failed(format!("cannot attach \"{name}\" over ublk: {e}")));
            }
            Err(_) => {
                return Err(failed(format!(
                    "cannot attach \"{name}\" over ublk: the kernel did not start the device within {}s",
                    WAIT.as_secs()
                )))
            }
        };
        let device = LocalDevice {
            name: name.to_string(),
            kind: "ublk".into(),
            path: format!("/dev/ublkb{dev_id}"),
            dev_id,
            read_only,
        };
        self.devices().insert(name.to_string(), Attached { device: device.clone(), thread });
        Ok(device)
    }
}

impl LocalDevices for Ublk {
    fn attach(&self, name: &str, read_only: bool) -> Result<LocalDevice, ControlError> {
        self.start(name, read_only, None)
    }

    fn detach(&self, name: &str) -> Result<LocalDevice, ControlError> {
        let _one = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(a) = self.devices().remove(name) else {
            return Err(ControlError::new(
                ErrorKind::NoSuchDevice,
                format!("device \"{name}\" is not attached over ublk"),
            ));
        };
        // STOP_DEV: the kernel fails new requests, the queue thread sees its queue
        // go down and returns; the device thread then deletes the device.
        let stop = UblkCtrl::new_simple(a.device.dev_id as i32).and_then(|c| c.kill_dev());
        if let Err(e) = stop {
            eprintln!("thinctl serve: stopping {}: {e}", a.device.path);
        }
        let begin = Instant::now();
        while !a.thread.is_finished() {
            if begin.elapsed() > WAIT {
                return Err(failed(format!("{} did not stop within {}s", a.device.path, WAIT.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = a.thread.join();
        Ok(a.device)
    }

    fn list(&self) -> Vec<LocalDevice> {
        self.devices().values().map(|a| a.device.clone()).collect()
    }
}

/// The device thread: add and start the ublk device for `export`, report its id
/// (or why it failed) on `started`, serve until it is stopped, delete it. The
/// export (and with it the attach count) is dropped when the queue is gone.
fn run_device(
    export: Arc<dyn Export>,
    target: Target,
    recover: Option<u32>,
    started: mpsc::Sender<Result<u32, String>>,
) {
    let read_only = target.read_only;
    // A device can be taken over by a restarted server where the kernel can
    // (UBLK_F_USER_RECOVERY: while no server runs, its I/O waits). Requests the dead
    // server had taken are re-issued to the next (REISSUE): a block write or read
    // done twice is harmless.
    let wanted = u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
    let recovery = UblkCtrl::get_features().is_some_and(|f| f & wanted == wanted);
    let ctrl = match UblkCtrlBuilder::default()
        .name("thinpool")
        .id(recover.map_or(-1, |id| id as i32))
        .ctrl_flags(if recovery { wanted } else { 0 })
        // One queue per CPU (blk-mq maps submitting CPUs to queues), each served by
        // its own thread, at most MAX_QUEUES.
        .nr_queues(std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_QUEUES)) as u16)
        .depth(QUEUE_DEPTH)
        .io_buf_bytes(IO_BUF_BYTES)
        .dev_flags(if recover.is_some() { UblkFlags::UBLK_DEV_F_RECOVER_DEV } else { UblkFlags::UBLK_DEV_F_ADD_DEV })
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = started.send(Err(format!("adding the device through {UBLK_CONTROL} failed: {e}")));
            return;
        }
    };
    let target_json = serde_json::to_value(&target).unwrap_or_default();
    let size = export.size();
    let block = u64::from(export.preferred_block_size()).clamp(4096, 1 << 20);
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_target_json(target_json);
        dev.set_default_params(size);
        let p = &mut dev.tgt.params;
        p.basic.attrs |= sys::UBLK_ATTR_FUA;
        if read_only {
            p.basic.attrs |= sys::UBLK_ATTR_READ_ONLY;
        }
        p.basic.io_opt_shift = block.trailing_zeros() as u8;
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard.discard_granularity = block as u32;
        p.discard.max_discard_sectors = u32::MAX >> 9;
        p.discard.max_write_zeroes_sectors = u32::MAX >> 9;
        p.discard.max_discard_segments = 1;
        Ok(())
    };
    let running = Arc::new(AtomicBool::new(false));
    let q_export = Arc::clone(&export);
    let queue = move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, &*q_export, read_only);
    let tx = started.clone();
    let flag = Arc::clone(&running);
    let r = ctrl.run_target(tgt_init, queue, move |ctrl: &UblkCtrl| {
        flag.store(true, Ordering::SeqCst);
        let _ = tx.send(Ok(ctrl.dev_info().dev_id));
    });
    if let Err(e) = r {
        if !running.load(Ordering::SeqCst) {
            let _ = started.send(Err(format!("starting the device failed: {e}")));
        }
    }
    // Stopped (detach, shutdown): delete the device. (A server that dies instead
    // leaves it quiesced for the next one.)
    let _ = ctrl.del_dev();
    drop(ctrl);
    drop(export);
}

/// A queue thread: fetch requests, execute them, commit the results, until the
/// queue goes down (the device was stopped).
fn serve_queue(qid: u16, dev: &UblkDev, export: &dyn Export, read_only: bool) {
    let bufs = std::cell::RefCell::new(dev.alloc_queue_io_bufs());
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("thinctl serve: ublk queue {qid}: {e:?}");
            return;
        }
    };
    let queue = {
        let b = bufs.borrow();
        match queue.submit_fetch_commands_unified(BufDescList::Slices(Some(&b))) {
            Ok(q) => q,
            Err(e) => {
                eprintln!("thinctl serve: ublk queue {qid}: {e:?}");
                return;
            }
        }
    };
    queue.wait_and_handle_io(|q: &UblkQueue, tag: u16, _: &UblkIOCtx| {
        let iod = *q.get_iod(tag);
        let mut b = bufs.borrow_mut();
        let Some(buf) = b.get_mut(usize::from(tag)) else { return };
        let res = serve_request(export, read_only, iod.op_flags, iod.start_sector, iod.nr_sectors, buf.as_mut_slice());
        if res < 0 {
            eprintln!(
                "thinctl serve: ublk request op {:#x} at sector {} ({} sectors) failed: errno {}",
                iod.op_flags, iod.start_sector, iod.nr_sectors, -res
            );
        }
        if let Err(e) = q.complete_io_cmd_unified(tag, BufDesc::Slice(buf.as_slice()), Ok(UblkIORes::Result(res))) {
            eprintln!("thinctl serve: ublk queue {qid}: completing a request: {e:?}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinpool::server::exports::ExportedDevice;
    use thinpool::server::service::{NoSpacePolicy, Service};
    use thinpool::volume::{CreateOptions, PoolDir};

    /// A served pool with device `web` of `size` bytes, opened as an export the way
    /// an attach opens it.
    fn export(data_bytes: u64, size: u64, read_only: bool) -> (tempfile::TempDir, Arc<Service>, Arc<dyn Export>) {
        let tmp = tempfile::tempdir().expect("tmp");
        let (mut pd, mut pool) =
            PoolDir::create(&tmp.path().join("p"), &CreateOptions { data_bytes, ..Default::default() }).expect("pool");
        pd.create_device(&mut pool, "web", size, None).expect("web");
        let service = Service::new(pool);
        service.set_no_space_policy(NoSpacePolicy::Error);
        let devices = vec![ExportedDevice { name: "web".into(), id: 0, size }];
        let catalog = PoolCatalog::new(Arc::clone(&service), devices, None, read_only);
        let export = catalog.open("web").expect("open");
        (tmp, service, export)
    }

    const R: u32 = sys::UBLK_IO_OP_READ;
    const W: u32 = sys::UBLK_IO_OP_WRITE;

    #[test]
    fn requests_go_through_the_export_and_complete_with_bytes_or_zero() {
        let (_tmp, service, ex) = export(16 << 20, 4 << 20, false);
        assert_eq!(service.attached(0), 1, "the export holds the attach count");
        let mut buf = vec![0u8; IO_BUF_BYTES as usize];
        buf[..8192].iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8);
        let written = buf[..8192].to_vec();
        assert_eq!(serve_request(&*ex, false, W | sys::UBLK_IO_F_FUA, 128, 16, &mut buf), 8192);
        buf.fill(0);
        assert_eq!(serve_request(&*ex, false, R, 128, 16, &mut buf), 8192);
        assert_eq!(&buf[..8192], &written[..]);
        // A flush has no range: its sector is all ones.
        assert_eq!(serve_request(&*ex, false, sys::UBLK_IO_OP_FLUSH, u64::MAX, 0, &mut buf), 0);
        // Write-zeroes without NOUNMAP unmaps whole blocks; with it, zeros are written.
        assert_eq!(
            serve_request(&*ex, false, sys::UBLK_IO_OP_WRITE_ZEROES | sys::UBLK_IO_F_NOUNMAP, 128, 8, &mut buf),
            0
        );
        assert_eq!(serve_request(&*ex, false, R, 128, 16, &mut buf), 8192);
        assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..8192] == written[4096..]);
        // A discard of the whole 64 KiB block unmaps it.
        let mapped = |s: &Service| s.extents(0, 0, 1 << 20).expect("extents").iter().any(|r| r.mapped);
        assert!(mapped(&service));
        assert_eq!(serve_request(&*ex, false, sys::UBLK_IO_OP_DISCARD, 128, 128, &mut buf), 0);
        assert!(!mapped(&service), "the discard unmapped the block");
        assert_eq!(serve_request(&*ex, false, R, 128, 16, &mut buf), 8192);
        assert!(buf[..8192].iter().all(|&b| b == 0));
        drop(ex);
        assert_eq!(service.attached(0), 0, "dropping the export releases the attach count");
    }

    #[test]
    fn bad_requests_read_only_devices_and_a_full_pool_get_negative_errnos() {
        let (_tmp, _service, ex) = export(1 << 20, 4 << 20, false);
        let mut buf = vec![7u8; IO_BUF_BYTES as usize];
        let sectors = (4 << 20) / 512;
        assert_eq!(serve_request(&*ex, false, R, sectors, 1, &mut buf), -libc::EINVAL, "past the end");
        assert_eq!(serve_request(&*ex, false, R, u64::MAX / 256, 1, &mut buf), -libc::EINVAL, "offset overflow");
        let over = (IO_BUF_BYTES / 512) + 8;
        assert_eq!(serve_request(&*ex, false, R, 0, over, &mut buf), -libc::EINVAL, "over the buffer");
        assert_eq!(serve_request(&*ex, false, 0x7f, 0, 1, &mut buf), -libc::EOPNOTSUPP);
        assert_eq!(serve_request(&*ex, true, W, 0, 8, &mut buf), -libc::EROFS);
        assert_eq!(serve_request(&*ex, true, sys::UBLK_IO_OP_DISCARD, 0, 8, &mut buf), -libc::EROFS);
        assert_eq!(serve_request(&*ex, true, R, 0, 8, &mut buf), 4096);
        // 1 MiB of data is 16 blocks: the 17th new block is refused with ENOSPC.
        let mut results = Vec::new();
        for block in 0..20u64 {
            results.push(serve_request(&*ex, false, W, block * 128, 8, &mut buf));
        }
        assert!(results[..16].iter().all(|&r| r == 4096), "{results:?}");
        assert_eq!(results[16..], [-libc::ENOSPC; 4]);
        assert_eq!(serve_request(&*ex, false, R, 0, 8, &mut buf), 4096, "still serving");
    }

    #[test]
    fn a_served_read_only_export_refuses_writes_with_the_nbd_errno() {
        let (_tmp, _service, ex) = export(16 << 20, 1 << 20, true);
        let mut buf = vec![1u8; 4096];
        // The export refuses (EPERM, as NBD clients get) even when the ublk side was
        // not told the device is read-only.
        assert_eq!(serve_request(&*ex, false, W, 0, 8, &mut buf), -libc::EPERM);
    }
}
