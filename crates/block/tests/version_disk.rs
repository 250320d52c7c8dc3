//! VersionDisk: random-access reads of committed versions against the model they were
//! imported from.

mod common;

use std::io::ErrorKind;
use std::sync::Arc;

use common::*;
use strata_block::{Disk, DiskExtent, VersionDisk};
use strata_store::Entry;

#[test]
fn reads_and_extents_match_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let store = new_store(tmp.path());
    let mut rng = Prng::new(7);
    // Depth 1 (one leaf), depth 2 with a short last block, and an all-unwritten image.
    for (i, (bs, blocks, tail)) in [(4096, 37, 100), (4096, 700, 1234), (8192, 300, 0)]
        .into_iter()
        .enumerate()
    {
        let model = random_model(&mut rng, bs, blocks, tail);
        let (id, _) = import(&store, &format!("img{i}"), &model);
        let disk = VersionDisk::open(store.clone(), id).unwrap();
        assert_eq!(disk.size(), model.bytes.len() as u64);
        assert_eq!(disk.block_size(), bs as u32);
        assert!(disk.read_only());
        assert_eq!(read_all(&disk), model.bytes);
        for _ in 0..300 {
            let off = rng.below(model.bytes.len() as u64);
            let len = rng.below((model.bytes.len() as u64 - off).min(5 * bs as u64) + 1);
            let mut buf = vec![0xAAu8; len as usize];
            disk.read_at(&mut buf, off).unwrap();
            assert_eq!(buf, &model.bytes[off as usize..(off + len) as usize]);
            check_extents(&disk, &model.bytes, off, len);
        }
        // Entries: unwritten blocks are unwritten, data blocks present.
        for b in 0..model.blocks() {
            let e = disk.entry(b as u64).unwrap();
            let zero = model.bytes[model.block_range(b)].iter().all(|&x| x == 0);
            match model.kinds[b] {
                Kind::Unwritten => assert_eq!(e, Entry::Unwritten),
                Kind::Zero => assert_eq!(e, Entry::Zero),
                Kind::Data if zero => assert_eq!(e, Entry::Zero),
                Kind::Data => assert!(matches!(e, Entry::Present(_))),
            }
        }
        // Extents over the whole disk: data exactly where blocks hold data.
        let ext = disk.extents(0, disk.size()).unwrap();
        let mut pos = 0u64;
        for DiskExtent { len, hole, zero } in ext {
            assert_eq!(hole, zero);
            for x in pos..pos + len {
                let b = x as usize / bs;
                let data = model.kinds[b] == Kind::Data
                    && !model.bytes[model.block_range(b)].iter().all(|&x| x == 0);
                assert_eq!(!hole, data, "byte {x} of block {b}");
            }
            pos += len;
        }
        assert_eq!(pos, disk.size());
    }
}

#[test]
fn refuses_writes_and_out_of_range_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let store = new_store(tmp.path());
    let model = random_model(&mut Prng::new(1), 4096, 10, 0);
    let (id, _) = import(&store, "img", &model);
    let disk: Arc<dyn Disk> = Arc::new(VersionDisk::open(store, id).unwrap());
    let ro = |e: std::io::Error| assert_eq!(e.kind(), ErrorKind::ReadOnlyFilesystem);
    ro(disk.write_at(&[1], 0, false).unwrap_err());
    ro(disk.write_zeroes(0, 4096, true, false).unwrap_err());
    ro(disk.trim(0, 4096, false).unwrap_err());
    disk.flush().unwrap();
    let mut buf = [0u8; 2];
    assert_eq!(
        disk.read_at(&mut buf, disk.size() - 1).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        disk.extents(disk.size(), 1).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}
