//! `ReadSharedFile`: the host reads a file a container left in a shared
//! mount (a training run's class-data archive), a bounded chunk at a time.

use std::os::unix::fs::FileExt;

use podvisor_proto::MAX_FILE_CHUNK;

use crate::mount_spec;
use crate::storage::{SharedMounts, open_file_beneath};

/// Up to [`MAX_FILE_CHUNK`] bytes of `path` in shared mount `name` at
/// `offset`, and whether they reach the end of the file.
pub fn read_chunk(
    shared: &SharedMounts,
    name: &str,
    path: &str,
    offset: u64,
) -> Result<(Vec<u8>, bool), String> {
    if !shared.is_made(name) {
        return Err(format!("no shared mount {name:?}"));
    }
    mount_spec::sub_path(path)?;
    let file = open_file_beneath(&mount_spec::shared_dir(name), path)
        .map_err(|e| format!("{path:?} in shared mount {name:?}: {e}"))?;
    read_at(&file, offset).map_err(|e| format!("{path:?} in shared mount {name:?}: {e}"))
}

fn read_at(file: &std::fs::File, offset: u64) -> std::io::Result<(Vec<u8>, bool)> {
    let size = file.metadata()?.len();
    let want = size.saturating_sub(offset).min(MAX_FILE_CHUNK as u64) as usize;
    let mut data = vec![0u8; want];
    let mut got = 0;
    while got < want {
        match file.read_at(&mut data[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    data.truncate(got);
    Ok((data, offset + got as u64 >= size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_file_and_end_with_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsa");
        let bytes: Vec<u8> = (0..MAX_FILE_CHUNK + 10).map(|i| i as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let (first, eof) = read_at(&file, 0).unwrap();
        assert_eq!((first.len(), eof), (MAX_FILE_CHUNK, false));
        let (rest, eof) = read_at(&file, MAX_FILE_CHUNK as u64).unwrap();
        assert_eq!((rest.as_slice(), eof), (&bytes[MAX_FILE_CHUNK..], true));
        let (past, eof) = read_at(&file, 1 << 40).unwrap();
        assert!(past.is_empty() && eof);
    }

    #[test]
    fn links_stay_inside_the_mount_and_only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mount");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(dir.path().join("secret"), b"host secret").unwrap();
        std::os::unix::fs::symlink("../secret", root.join("up")).unwrap();
        std::os::unix::fs::symlink("/secret", root.join("abs")).unwrap();
        std::fs::write(root.join("secret"), b"mine").unwrap();
        // Resolved in the mount: `../secret` and `/secret` are its own file.
        let mut s = String::new();
        use std::io::Read;
        open_file_beneath(&root, "up")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "mine");
        std::fs::remove_file(root.join("secret")).unwrap();
        assert!(open_file_beneath(&root, "abs").is_err());
        std::fs::create_dir(root.join("dir")).unwrap();
        assert!(open_file_beneath(&root, "dir").is_err());
    }
}
