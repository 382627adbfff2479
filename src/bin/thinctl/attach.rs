//! `thinctl attach` and `thinctl detach`: local block devices (ublk) of a served
//! pool, asked of the running server through its control socket (the server owns
//! the devices: it serves their I/O).

use std::path::Path;

use thinpool::server::local::LocalDevice;
use thinpool::server::protocol::{Request, Response};

use crate::error::{msg, CliResult};
use crate::remote;

fn ask(dir: &Path, request: Request) -> CliResult<Response> {
    remote::forward(dir, request)?.ok_or_else(|| {
        msg(format!(
            "pool {} is not served: local devices are served by `thinctl serve {}` (start it first, or use `thinctl serve --ublk NAME`)",
            dir.display(),
            dir.display()
        ))
    })
}

fn json(value: &impl serde::Serialize) -> CliResult {
    println!("{}", serde_json::to_string(value).map_err(|e| msg(e.to_string()))?);
    Ok(())
}

/// `thinctl attach DIR NAME [--read-only]`: prints the block device's path.
pub fn attach(dir: &Path, name: &str, read_only: bool, as_json: bool) -> CliResult {
    match ask(dir, Request::Attach { name: name.to_string(), read_only })? {
        Response::Attached { device } if as_json => json(&device),
        Response::Attached { device } => {
            println!("{}", device.path);
            Ok(())
        }
        other => Err(remote::unexpected(dir, &other)),
    }
}

/// `thinctl detach DIR NAME`.
pub fn detach(dir: &Path, name: &str, as_json: bool) -> CliResult {
    match ask(dir, Request::Detach { name: name.to_string() })? {
        Response::Detached { device } if as_json => json(&device),
        Response::Detached { device } => {
            println!("detached \"{}\" ({} removed)", device.name, device.path);
            Ok(())
        }
        other => Err(remote::unexpected(dir, &other)),
    }
}

/// `thinctl attach DIR`: the attached devices.
pub fn list(dir: &Path, as_json: bool) -> CliResult {
    let devices: Vec<LocalDevice> = match ask(dir, Request::LocalDevices)? {
        Response::LocalDevices { devices } => devices,
        other => return Err(remote::unexpected(dir, &other)),
    };
    if as_json {
        #[derive(serde::Serialize)]
        struct List<'a> {
            devices: &'a [LocalDevice],
        }
        return json(&List { devices: &devices });
    }
    for d in &devices {
        println!("{}\t{}\t{}{}", d.name, d.kind, d.path, if d.read_only { "\tread-only" } else { "" });
    }
    Ok(())
}
