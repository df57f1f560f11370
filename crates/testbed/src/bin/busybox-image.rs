//! Writes a small OCI image archive holding the host's busybox (from the
//! `busybox-static` package), for the quick start and benchmarks:
//! `busybox-image OUT.tar [TAG] [--with PROGRAM]...`. Each `--with` adds a
//! host program and the shared libraries it needs, at their host paths
//! (e.g. `--with /usr/bin/iperf3` for the network benchmark).

use podvisor_testbed::oci::{ImageBuilder, host_program_entries};

fn main() {
    let usage = || -> ! {
        eprintln!("usage: busybox-image OUT.tar [TAG] [--with PROGRAM]...");
        std::process::exit(2);
    };
    let mut positional = Vec::new();
    let mut programs = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--with" {
            programs.push(args.next().unwrap_or_else(|| usage()));
        } else {
            positional.push(arg);
        }
    }
    let (out, tag) = match positional.as_slice() {
        [out] => (out.clone(), "busybox:latest".to_string()),
        [out, tag] => (out.clone(), tag.clone()),
        _ => usage(),
    };
    let mut builder = ImageBuilder::new().busybox_layer();
    for program in &programs {
        match host_program_entries(std::path::Path::new(program)) {
            Ok(entries) => builder = builder.layer(entries),
            Err(e) => {
                eprintln!("busybox-image: {program}: {e}");
                std::process::exit(1);
            }
        }
    }
    let built = builder
        .cmd(&["sh"])
        .tag(&tag)
        .write_oci_archive(std::path::Path::new(&out));
    match built {
        Ok(img) => println!("{out}: {tag} ({})", img.manifest_digest),
        Err(e) => {
            eprintln!("busybox-image: {e}");
            std::process::exit(1);
        }
    }
}
