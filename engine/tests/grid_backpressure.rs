//! Bounded flow through the grid: a producer faster than the engine's consumer is slowed
//! down, never buffered without limit.

use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, doc};
use livegrid_engine::memory::SharedMemory;
use livegrid_engine::{ChangeEvent, ChangeOp, Engine, EngineConfig, EngineEvent};
use livegrid_matcher::QuerySpec;
use livegrid_protocol::Frame;

/// A producer faster than the engine's consumer is slowed down, not buffered without limit:
/// with nobody reading the engine's messages, `submit` stops returning once the bounded
/// output and the in-flight limit are full, and goes on once someone reads.
#[test]
fn a_producer_is_slowed_when_nobody_reads() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let memory = Arc::new(SharedMemory::default());
    let config = EngineConfig { output_capacity: 16, max_inflight: 2, ..Default::default() };
    let engine = Arc::new(Engine::start(config, memory.clone()).unwrap());
    engine.register("db.flow", &QuerySpec::default()).unwrap();
    let submitted = Arc::new(AtomicU64::new(0));
    let producer = {
        let (engine, submitted) = (engine.clone(), submitted.clone());
        std::thread::spawn(move || {
            for position in 1..=2_000u64 {
                let doc = Arc::new(doc! {"_id": position as i64});
                let event = ChangeEvent {
                    position: position.into(),
                    ns: "db.flow".into(),
                    op: ChangeOp::Insert,
                    id: Bson::Int64(position as i64),
                    doc: Some(doc),
                };
                engine.submit([event]).unwrap();
                submitted.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let stalled_at = submitted.load(Ordering::Relaxed);
    assert!(stalled_at < 2_000, "the producer was never slowed: all {stalled_at} writes went in unread");
    // Reading lets it finish, and every write arrives.
    let mut deltas = 0;
    while deltas < 2_000 {
        if let Ok(EngineEvent::Messages(batch)) = engine.messages().recv_timeout(Duration::from_secs(30)) {
            deltas += batch.iter().filter(|m| matches!(m.frame, Frame::Delta(_))).count();
        }
    }
    producer.join().unwrap();
    assert_eq!(submitted.load(Ordering::Relaxed), 2_000);
}
