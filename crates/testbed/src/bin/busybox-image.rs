//! Writes a small OCI image archive holding the host's busybox (from the
//! `busybox-static` package), for the quick start and benchmarks:
//! `busybox-image OUT.tar [TAG]`.

use podvisor_testbed::oci::ImageBuilder;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next() else {
        eprintln!("usage: busybox-image OUT.tar [TAG]");
        std::process::exit(2);
    };
    let tag = args.next().unwrap_or_else(|| "busybox:latest".into());
    let built = ImageBuilder::new()
        .busybox_layer()
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
