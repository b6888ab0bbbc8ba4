//! The branch against the pipeline run from scratch: random documents, writes and deletes,
//! pipelines registered at the start and midway; after every step the group outputs, built
//! only from the branch's changes, equal `Pipeline::group_outputs` on the current documents.
//! On 1 worker and on 4 (the 2x2 grid's worker count).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bson::{Bson, Document, doc};
use differential_dataflow::input::Input;
use livegrid_matcher::Pipeline;
use livegrid_matcher::pipeline::accumulator::Ordered;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::InputHandle;
use timely::dataflow::operators::Input as _;

use super::{GroupOutput, Registry, Time, Upsert, build, group_key};

type Output = Arc<Mutex<Vec<(GroupOutput, Time, isize)>>>;

fn pipelines(base: u64) -> Vec<(u64, &'static str, Vec<Document>, Time)> {
    vec![
        (
            base,
            "db.c",
            vec![
                doc! {"$group": {"_id": "$g", "s": {"$sum": "$v"}, "a": {"$avg": "$v"}, "n": {"$count": {}}, "lo": {"$min": "$v"}, "hi": {"$max": "$v"}}},
            ],
            0,
        ),
        (
            base + 1,
            "db.c",
            vec![
                doc! {"$match": {"v": {"$gte": 3}}},
                doc! {"$sort": {"v": -1}},
                doc! {"$group": {"_id": null, "gs": {"$addToSet": "$g"}, "first": {"$first": "$v"}, "last": {"$last": "$_id"}}},
            ],
            0,
        ),
        (base + 2, "db.c", vec![doc! {"$unwind": "$tags"}, doc! {"$group": {"_id": "$tags", "n": {"$sum": 1}}}], 0),
        (
            base + 3,
            "db.c",
            vec![
                doc! {"$group": {"_id": {"$cond": [{"$gt": ["$v", 5]}, "big", "small"]}, "n": {"$sum": 1}, "m": {"$max": {"$month": "$d"}}}},
            ],
            20,
        ),
        (base + 4, "db.other", vec![doc! {"$group": {"_id": "$g", "n": {"$sum": 1}}}], 0),
    ]
}

fn next(seed: &mut u64, n: u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed % n
}

fn random_doc(seed: &mut u64, id: i64) -> Document {
    let mut doc = doc! {"_id": id};
    match next(seed, 5) {
        0 => {}
        1 => {
            doc.insert("g", Bson::Null);
        }
        g => {
            doc.insert("g", format!("g{g}"));
        }
    }
    let v = match next(seed, 4) {
        0 => Bson::Double(next(seed, 20) as f64 / 2.0),
        1 => Bson::String("text".into()),
        _ => Bson::Int32(next(seed, 10) as i32),
    };
    doc.insert("v", v);
    let tags: Vec<Bson> = (0..next(seed, 3)).map(|_| Bson::Int32(next(seed, 3) as i32)).collect();
    doc.insert("tags", tags);
    doc.insert(
        "d",
        Bson::DateTime(bson::DateTime::from_millis(1_700_000_000_000 + next(seed, 90) as i64 * 86_400_000)),
    );
    doc
}

/// The outputs of `id` at `time`, from the branch's changes.
fn outputs_at(output: &Output, id: u64, time: Time) -> Vec<Document> {
    let mut counts: BTreeMap<(Vec<u8>, Vec<u8>), isize> = BTreeMap::new();
    for (((pipeline, key), doc), at, diff) in output.lock().unwrap().iter() {
        if *pipeline == id && *at <= time {
            *counts.entry((key.clone(), doc.clone())).or_default() += diff;
        }
    }
    let mut docs: Vec<(Ordered, Document)> = Vec::new();
    for ((key, bytes), count) in counts {
        assert!(count == 0 || count == 1, "a group output counted {count} times");
        if count == 1 {
            docs.push((Ordered(group_key(&key)), Document::from_reader(bytes.as_slice()).unwrap()));
        }
    }
    docs.sort_by(|a, b| a.0.cmp(&b.0));
    docs.into_iter().map(|(_, d)| d).collect()
}

fn run(workers: usize, seed: u64, steps: u64) {
    let base = 1_000 * seed + 10 * workers as u64;
    let specs = pipelines(base);
    for (id, _, stages, _) in &specs {
        let stages: Vec<Bson> = stages.iter().cloned().map(Bson::Document).collect();
        Registry::global().insert(*id, Arc::new(Pipeline::parse(&stages).unwrap()));
    }
    let output: Output = Arc::default();
    let sink = output.clone();
    timely::execute(timely::Config::process(workers), move |worker| {
        let mut upserts: InputHandle<Time, CapacityContainerBuilder<Vec<Upsert>>> = InputHandle::new();
        let sink = sink.clone();
        let (mut registrations, probe) = worker.dataflow::<Time, _, _>(|scope| {
            let stream = scope.input_from(&mut upserts);
            let (registrations, pipelines) = scope.new_collection::<(u64, String), isize>();
            let (probe, _) = build(stream, pipelines, workers as u64)
                .inspect(move |update| sink.lock().unwrap().push(update.clone()))
                .probe();
            (registrations, probe)
        });
        if worker.index() != 0 {
            return;
        }
        let mut seed = seed;
        let mut model: BTreeMap<i64, Document> = BTreeMap::new();
        for step in 0..steps {
            for (id, ns, _, from) in &specs {
                if *from == step {
                    registrations.advance_to(step * 10);
                    registrations.insert((*id, ns.to_string()));
                }
            }
            // Every write its own time (positions are distinct): the order of upserts of one
            // key at one time is not defined.
            for write in 0..1 + next(&mut seed, 3) {
                let at = step * 10 + write;
                let id = next(&mut seed, 25) as i64;
                let key = format!("db.c/{id}").into_bytes();
                if model.contains_key(&id) && next(&mut seed, 4) == 0 {
                    model.remove(&id);
                    upserts.send((key, None, at));
                } else {
                    let doc = random_doc(&mut seed, id);
                    upserts.send((key, Some(("db.c".to_string(), doc.to_vec().unwrap())), at));
                    model.insert(id, doc);
                }
            }
            upserts.advance_to((step + 1) * 10);
            registrations.advance_to((step + 1) * 10);
            registrations.flush();
            while probe.less_than(upserts.time()) {
                worker.step();
            }
            for (id, ns, stages, at) in &specs {
                if *at > step {
                    continue;
                }
                let stages: Vec<Bson> = stages.iter().cloned().map(Bson::Document).collect();
                let pipeline = Pipeline::parse(&stages).unwrap();
                let expected = if *ns == "db.c" { pipeline.group_outputs(model.values()) } else { Vec::new() };
                assert_eq!(
                    outputs_at(&output, *id, step * 10 + 9),
                    expected,
                    "pipeline {id} after step {step} on {workers} workers"
                );
            }
        }
    })
    .unwrap();
}

#[test]
fn one_worker_follows_the_pipelines_exactly() {
    for seed in [1, 2] {
        run(1, seed, 60);
    }
}

#[test]
fn four_workers_follow_the_pipelines_exactly() {
    run(4, 3, 40);
}
