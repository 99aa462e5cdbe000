//! Hot-path micro-benchmarks: request parsing (client → proxy), reply scanning
//! (backend → proxy), command lookup + policy decision, and a request's cluster slot,
//! through the public API only.
//!
//! Run: `cargo bench --bench protocol` (whole run < 1 minute). Each case reports
//! throughput in elements (requests / replies / decisions) or bytes (large bulk).
//! Buffers are built outside the timed part (`iter_batched`) unless the copy into the
//! buffer is part of what the proxy really does per read (the 64 KiB pieces case).

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use portcullis::cluster::request_slot;
use portcullis::command::{lookup, lookup_name};
use portcullis::policy::{decide, Policy, ProtectionConfig};
use portcullis::protocol::{ReplyLimits, ReplyScanner, Request, RequestLimits, RequestParser};

/// `SET key:000001 xxx` as redis-benchmark sends it.
const SET_FRAME: &[u8] = b"*3\r\n$3\r\nSET\r\n$10\r\nkey:000001\r\n$3\r\nxxx\r\n";
/// `GET key:000001`.
const GET_FRAME: &[u8] = b"*2\r\n$3\r\nGET\r\n$10\r\nkey:000001\r\n";
/// Commands in the pipeline cases (redis-benchmark `-P 16`).
const PIPELINE: usize = 16;

fn set_pipeline() -> Vec<u8> {
    SET_FRAME.repeat(PIPELINE)
}

fn reply_pipeline() -> Vec<u8> {
    // What a SET/GET pipeline gets back: alternate +OK and a 3-byte bulk.
    let mut v = Vec::new();
    for i in 0..PIPELINE {
        if i % 2 == 0 {
            v.extend_from_slice(b"+OK\r\n");
        } else {
            v.extend_from_slice(b"$3\r\nbar\r\n");
        }
    }
    v
}

fn request_parser(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_set_resp", |b| {
        let mut parser = RequestParser::new(RequestLimits::default());
        b.iter_batched(
            || BytesMut::from(SET_FRAME),
            |mut buf| {
                let req = parser.parse(&mut buf).unwrap().unwrap();
                black_box(req)
            },
            BatchSize::SmallInput,
        )
    });

    g.bench_function("parse_inline_set_a_b", |b| {
        let mut parser = RequestParser::new(RequestLimits::default());
        b.iter_batched(
            || BytesMut::from(&b"SET a b\r\n"[..]),
            |mut buf| {
                let req = parser.parse(&mut buf).unwrap().unwrap();
                black_box(req)
            },
            BatchSize::SmallInput,
        )
    });

    let pipe = set_pipeline();
    g.throughput(Throughput::Elements(PIPELINE as u64));
    g.bench_function("parse_pipeline_16_set", |b| {
        let mut parser = RequestParser::new(RequestLimits::default());
        b.iter_batched(
            || BytesMut::from(&pipe[..]),
            |mut buf| {
                let mut out = Vec::with_capacity(PIPELINE);
                while let Some(req) = parser.parse(&mut buf).unwrap() {
                    out.push(req);
                }
                assert_eq!(out.len(), PIPELINE);
                out
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn reply_scanner(c: &mut Criterion) {
    let mut g = c.benchmark_group("reply");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    g.throughput(Throughput::Elements(1));
    for (name, frame) in [
        ("scan_simple_ok", &b"+OK\r\n"[..]),
        ("scan_bulk_3", &b"$3\r\nbar\r\n"[..]),
    ] {
        g.bench_function(name, |b| {
            let mut scanner = ReplyScanner::new(ReplyLimits::default());
            b.iter_batched(
                || BytesMut::from(frame),
                |mut buf| {
                    let reply = scanner.next(&mut buf).unwrap().unwrap();
                    black_box(reply)
                },
                BatchSize::SmallInput,
            )
        });
    }

    let pipe = reply_pipeline();
    g.throughput(Throughput::Elements(PIPELINE as u64));
    g.bench_function("scan_pipeline_16", |b| {
        let mut scanner = ReplyScanner::new(ReplyLimits::default());
        b.iter_batched(
            || BytesMut::from(&pipe[..]),
            |mut buf| {
                let mut out = Vec::with_capacity(PIPELINE);
                while let Some(reply) = scanner.next(&mut buf).unwrap() {
                    out.push(reply);
                }
                assert_eq!(out.len(), PIPELINE);
                out
            },
            BatchSize::SmallInput,
        )
    });
    // The same pipeline as a shared connection reads it: scanned in place, one split
    // for the run, a shape per reply (what `scan_pipeline_16` does with a `Reply` each).
    g.bench_function("scan_pipeline_16_in_place", |b| {
        let mut scanner = ReplyScanner::new(ReplyLimits::default());
        b.iter_batched(
            || BytesMut::from(&pipe[..]),
            |mut buf| {
                let mut shapes = Vec::with_capacity(PIPELINE);
                while let Some(shape) = scanner.next_in_place(&mut buf).unwrap() {
                    shapes.push(shape);
                }
                assert_eq!(shapes.len(), PIPELINE);
                (scanner.split_scanned(&mut buf), shapes)
            },
            BatchSize::SmallInput,
        )
    });

    // 1 MiB bulk arriving in 64 KiB reads: the copy into the buffer is timed too (the
    // session does it per read), so this is "bytes handled per second" end to end.
    const BULK: usize = 1 << 20;
    const PIECE: usize = 64 * 1024;
    let mut big = format!("${BULK}\r\n").into_bytes();
    big.extend(std::iter::repeat(b'x').take(BULK));
    big.extend_from_slice(b"\r\n");
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.sample_size(30);
    g.bench_function("scan_bulk_1MiB_in_64KiB_pieces", |b| {
        let mut scanner = ReplyScanner::new(ReplyLimits::default());
        b.iter_batched(
            || BytesMut::with_capacity(big.len()),
            |mut buf| {
                let mut reply = None;
                for piece in big.chunks(PIECE) {
                    buf.extend_from_slice(piece);
                    reply = scanner.next(&mut buf).unwrap();
                }
                reply.expect("complete after the last piece")
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn lookup_and_policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(1));

    let policy = Policy::new(&ProtectionConfig::default()).expect("default policy compiles");
    let cases: [(&str, &[&str]); 3] = [
        ("get", &["GET", "key:000001"]),
        ("set", &["SET", "key:000001", "xxx"]),
        ("config_get", &["CONFIG", "GET", "maxmemory"]),
    ];
    for (name, args) in cases {
        let req = Request::from_args(args);
        g.bench_function(format!("lookup_{name}"), |b| {
            b.iter(|| lookup(black_box(req.arg(0).unwrap()), black_box(req.arg(1))))
        });
        g.bench_function(format!("decide_{name}"), |b| {
            b.iter(|| decide(black_box(&policy), black_box(&req)))
        });
    }
    g.finish();
}

/// The cluster slot of a request (legacy key range for plain commands, key specs for
/// `movablekeys` ones), per request in cluster mode.
fn cluster_slot(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(1));
    let cases: [(&str, &[&str]); 4] = [
        ("get", &["GET", "key:000001"]),
        ("set", &["SET", "key:000001", "xxx"]),
        (
            "mset_4",
            &["MSET", "{k}1", "a", "{k}2", "b", "{k}3", "c", "{k}4", "d"],
        ),
        ("eval_2", &["EVAL", "return 1", "2", "{k}1", "{k}2", "x"]),
    ];
    for (name, args) in cases {
        let req = Request::from_args(args);
        let spec = lookup_name(&args[0].to_ascii_lowercase()).expect("known command");
        g.bench_function(format!("slot_{name}"), |b| {
            b.iter(|| request_slot(black_box(spec), black_box(&req)))
        });
    }
    g.finish();
}

/// Sanity: the frames above parse to what they claim (fails fast if the API drifts).
fn check_inputs() {
    let mut p = RequestParser::new(RequestLimits::default());
    let mut buf = BytesMut::from(GET_FRAME);
    let req = p.parse(&mut buf).unwrap().unwrap();
    assert_eq!(req.arg(0), Some(&b"GET"[..]));
}

fn benches(c: &mut Criterion) {
    check_inputs();
    request_parser(c);
    reply_scanner(c);
    lookup_and_policy(c);
    cluster_slot(c);
}

criterion_group!(protocol, benches);
criterion_main!(protocol);
