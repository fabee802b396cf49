//! Property tests: chunk → (group) → compress → encrypt → pack → index → read round-trips.

use std::sync::Arc;

use fastcdc::v2020::{FastCDC, Normalization};
use proptest::prelude::*;

use crate::blob::{encode, encode_group, BlobType, EncodeSettings, Member};
use crate::index::{Index, IndexFile, IndexPack};
use crate::keyfile::KdfParams;
use crate::object::{open_object, seal_object, ObjectKind};
use crate::pack::Packer;
use crate::repo::{InitOptions, Repository};
use crate::target::store::StoreTarget;
use crate::target::TargetRef;

fn repo(compression: i32, padding: bool) -> Repository {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let t: TargetRef = Arc::new(StoreTarget::memory("mem"));
    let opts = InitOptions {
        kdf: KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        },
        compression,
        padding,
        ..InitOptions::default()
    };
    rt.block_on(Repository::init(vec![t], b"pw", &opts))
        .unwrap()
}

/// Inputs mixing compressible runs and noise, like mail with attachments.
fn input() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let one = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..20_000),
        (any::<u8>(), 0usize..30_000).prop_map(|(b, n)| vec![b; n]),
        prop::collection::vec(prop::sample::select(b"abc de\n".to_vec()), 0..30_000),
    ];
    prop::collection::vec(one, 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_through_packs_and_index(files in input(), level in prop_oneof![Just(0), Just(3), Just(19)], padding in any::<bool>(), pack_size in 1usize..40_000, group_max in 0usize..6) {
        let repo = repo(level, padding);
        let writer = repo.keys().with_new_session();
        let keys = &writer;
        let settings = EncodeSettings { zstd_level: level, padding };
        let mut packer = Packer::new(BlobType::Data, pack_size);
        let mut packs = Vec::new();
        let mut file_ids = Vec::new();
        // Chunks up to 2 KiB go into groups of up to `group_max` members (0: none).
        let (mut plain, mut members) = (Vec::new(), Vec::<Member>::new());
        let seal_group = |plain: &mut Vec<u8>, members: &mut Vec<Member>, packs: &mut Vec<_>, packer: &mut Packer| {
            if !members.is_empty() {
                let g = encode_group(keys, settings, std::mem::take(members), plain).unwrap();
                plain.clear();
                packs.extend(packer.add(keys, g));
            }
        };
        for data in &files {
            let mut ids = Vec::new();
            let cuts: Vec<(usize, usize)> = if data.is_empty() { vec![] } else {
                FastCDC::with_level_and_seed(data, 256, 1024, 4096, Normalization::Level1, keys.chunker_seed())
                    .map(|c| (c.offset, c.length)).collect()
            };
            for (o, l) in cuts {
                let chunk = &data[o..o + l];
                let id = keys.blob_id(chunk);
                ids.push(id);
                if group_max > 0 && chunk.len() <= 2048 {
                    members.push(Member { id, inner: plain.len() as u32, len: chunk.len() as u32 });
                    plain.extend_from_slice(chunk);
                    if members.len() >= group_max {
                        seal_group(&mut plain, &mut members, &mut packs, &mut packer);
                    }
                } else if let Some(p) = packer.add(keys, encode(keys, settings, BlobType::Data, id, chunk).unwrap()) {
                    packs.push(p);
                }
            }
            file_ids.push(ids);
        }
        seal_group(&mut plain, &mut members, &mut packs, &mut packer);
        packs.extend(packer.finish(keys));
        for p in &packs {
            prop_assert_eq!(&crate::pack::read_header(keys, "p", &p.bytes).unwrap(), &p.entries);
        }
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let target = repo.primary().unwrap().clone();
        let session = writer.session().unwrap();
        rt.block_on(target.put_new(&session.object_name(), session.wrapped().to_vec().into())).unwrap();
        for p in &packs {
            rt.block_on(target.put_new(&p.object_name(), p.bytes.clone())).unwrap();
        }
        // A reader opened from storage unwraps the data key from its object.
        let (reader, _) = rt.block_on(Repository::open(vec![target.clone()], b"pw")).unwrap();
        // The index survives sealing and opening.
        let file = IndexFile { packs: packs.iter().map(IndexPack::from_finished).collect() };
        let (oid, bytes) = seal_object(keys, ObjectKind::Index, &file);
        let reopened: IndexFile = open_object(keys, ObjectKind::Index, &oid, &bytes).unwrap();
        prop_assert_eq!(&reopened, &file);
        let index = Index::from_files([&reopened]);
        for (data, ids) in files.iter().zip(&file_ids) {
            let mut back = Vec::new();
            for id in ids {
                back.extend(rt.block_on(reader.read_blob(&index, BlobType::Data, id)).unwrap());
            }
            prop_assert_eq!(&back, data);
        }
    }
}
