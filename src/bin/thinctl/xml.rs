//! `dump` and `restore`: the library's `thinpool::xml` with a progress bar and the
//! messages of the command line.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter};
use std::path::Path;

use thinpool::volume::Access;
use thinpool::xml::{DirTarget, RestoreEvents, RestoreOptions};

use crate::cli::{default_dir, RestoreArgs};
use crate::error::{msg, CliResult};
use crate::open::{open_pool, warn_all};
use crate::progress::{Progress, Unit};

/// `thinctl dump`.
pub fn dump(dir: &Path) -> CliResult {
    let (_pd, mut pool) = open_pool(dir, Access::Read)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
    let mut bar: Option<Progress> = None;
    thinpool::xml::dump(&mut pool, &mut out, &mut |done, total| {
        bar.get_or_insert_with(|| Progress::new("dumping", total.max(1), Unit::Items)).set(done);
    })?;
    Ok(())
}

/// Progress on standard error; warnings printed as they come.
struct Shown {
    bar: Option<Progress>,
}

impl RestoreEvents for Shown {
    fn progress(&mut self, bytes_read: u64) {
        if let Some(bar) = &mut self.bar {
            bar.set(bytes_read);
        }
    }

    fn warnings(&mut self, warnings: Vec<String>) {
        warn_all(warnings);
        self.bar = None;
    }
}

/// `thinctl restore`.
pub fn restore(args: &RestoreArgs) -> CliResult {
    let dir = args.dir.clone().unwrap_or_else(default_dir);
    let target = DirTarget::prepare(&dir, RestoreOptions { force: args.force, metadata_bytes: args.metadata_size })?;
    let (mut input, len): (Box<dyn BufRead>, u64) = match &args.input {
        Some(p) => {
            let f = File::open(p).map_err(|e| msg(format!("cannot open {}: {e}", p.display())))?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            (Box::new(BufReader::with_capacity(1 << 20, f)), len)
        }
        None => (Box::new(BufReader::with_capacity(1 << 20, std::io::stdin())), 0),
    };
    let mut shown = Shown { bar: Some(Progress::new("restoring", len, Unit::Bytes)) };
    let s = target.restore(&mut input, &mut shown)?;
    println!(
        "restored {} devices and {} mappings into {} ({} data blocks of {} bytes)",
        s.devices,
        s.mappings,
        dir.display(),
        s.nr_data_blocks,
        s.block_bytes
    );
    Ok(())
}
