//! A partclone stream as Clonezilla stores it (after decompression).
#![no_main]
use klon::clonezilla::BlockSource;
use klon::clonezilla::partclone::PartcloneReader;
use klon::clonezilla::pieces::PiecePos;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pos = PiecePos::single(std::path::Path::new("fuzz.img"));
    let Ok(mut r) = PartcloneReader::new(Box::new(std::io::Cursor::new(data.to_vec())), pos) else { return };
    // Every run consumes input; a stream that yields more runs than it has
    // bytes (plus the header's count of zero-length ends) loops.
    let mut budget = data.len() as u64 * 8 + 64;
    while let Ok(Some((_off, run))) = r.next_run(1 << 20) {
        budget = budget.checked_sub(1).expect("reader yields runs without consuming input");
        assert!(run.len() <= 1 << 20);
    }
});
