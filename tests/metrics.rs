//! Observability: the `/metrics` + `/health` endpoint scraped and parsed as Prometheus text, promtool on the exposition and the monitoring rules, training's metrics, and a real Prometheus scraping a running training.

mod common;

#[path = "common/runtime.rs"]
mod rt;
use common::{free_port, root, scratch};
use rt::*;

use std::process::Command;

use deem_actors::runtime::topology::Topology;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_parseable_prometheus_text() {
    let metrics = deem_actors::runtime::metrics::Metrics::new();
    let server = deem_actors::runtime::http::Server::start(
        "127.0.0.1:0".parse().unwrap(),
        deem_actors::runtime::http::router(metrics),
    )
    .await
    .unwrap();
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();

    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let body: serde_json::Value = serde_json::from_str(&health.text().await.unwrap()).unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(
        client
            .get(format!("{base}/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Prometheus negotiates OpenMetrics; everything else gets the classic text format.
    let resp = client
        .get(format!("{base}/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let open = resp.text().await.unwrap();
    assert!(
        open.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF: {open}"
    );
    assert!(
        open.contains("# TYPE deem_http_requests counter\n"),
        "{open}"
    );

    let resp = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let body = resp.text().await.unwrap();
    assert!(!body.contains("# EOF"), "{body}");
    assert!(
        body.contains("# TYPE deem_http_requests_total counter\n"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE process_cpu_seconds_total counter\n"),
        "{body}"
    );

    // Every sample line is well-formed, and every family has HELP and TYPE.
    let sample = regex_lite_sample();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        assert!(sample(line), "malformed sample line {line:?}");
    }
    let scrape = scrape_text(&body);
    for s in &scrape.samples {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| s.metric.strip_suffix(suffix))
            .unwrap_or(&s.metric);
        assert!(
            scrape.docs.contains_key(family) || scrape.docs.contains_key(&s.metric),
            "{} has no HELP",
            s.metric
        );
        assert!(
            s.metric.starts_with("deem_") || s.metric.starts_with("process_"),
            "{} is not namespaced",
            s.metric
        );
    }

    let build = scrape
        .samples
        .iter()
        .find(|s| s.metric == "deem_build_info")
        .expect("deem_build_info");
    assert_eq!(build.value, prometheus_parse::Value::Gauge(1.0));
    assert_eq!(build.labels.get("version"), Some(deem::VERSION));
    assert_eq!(build.labels.get("libtorch"), deem::LIBTORCH_VERSION);
    assert_eq!(
        build.labels.get("cuda_devices"),
        Some(deem::device::cuda_device_count().to_string().as_str())
    );

    for name in [
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
        "process_threads",
    ] {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        match s.value {
            prometheus_parse::Value::Gauge(v) => assert!(v > 0.0, "{name} = {v}"),
            ref v => panic!("{name} is not a gauge: {v:?}"),
        }
    }
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric == "process_cpu_seconds_total"));

    // The requests above were counted, by route and status.
    let count = |route: &str, status: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "deem_http_requests_total"
                    && s.labels.get("route") == Some(route)
                    && s.labels.get("status") == Some(status)
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) => v,
                ref v => panic!("not a counter: {v:?}"),
            })
    };
    assert_eq!(count("/health", "200"), Some(1.0));
    assert_eq!(count("unmatched", "404"), Some(1.0));
    assert_eq!(
        count("/metrics", "200"),
        Some(1.0),
        "the OpenMetrics scrape before this one"
    );

    promtool_check(&body);
    server.stop().await.unwrap();
}

/// `name{labels} value` with an optional timestamp, as the exposition formats allow.
fn regex_lite_sample() -> impl Fn(&str) -> bool {
    |line: &str| {
        let (name_labels, rest) = match line.rfind('}') {
            Some(i) => (&line[..=i], line[i + 1..].trim()),
            None => match line.split_once(' ') {
                Some((n, r)) => (n, r.trim()),
                None => return false,
            },
        };
        let name = name_labels.split('{').next().unwrap_or("");
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        let value_ok = rest
            .split_whitespace()
            .next()
            .is_some_and(|v| v.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&v));
        name_ok && value_ok
    }
}

/// Lints the exposition with the real Prometheus `promtool` where it is installed (CI installs it).
fn promtool_check(body: &str) {
    use std::io::Write;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed: skipping the Prometheus lint (CI installs it)");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------- the binary
#[test]
fn monitoring_config_and_rules_pass_promtool() {
    let dir = root().join("monitoring");
    let Ok(out) = Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(dir.join("prometheus.yml"))
        .output()
    else {
        eprintln!("promtool not installed: skipping (CI installs it)");
        return;
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(dir.join("alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every deem_* / process_* metric the rules and the dashboard use is one deem exports: populate every
    // family with a short pipelined run and a request, then look each name up.
    let metrics = deem_actors::runtime::metrics::Metrics::new();
    let labels = deem_actors::runtime::metrics::HttpLabels {
        route: "/metrics".into(),
        status: "200".into(),
    };
    metrics.http_requests.get_or_create(&labels).inc();
    // The serving families with labels appear once a value exists (the serve tests exercise them).
    let serve = &metrics.serve;
    serve
        .requests
        .get_or_create(&deem_actors::runtime::metrics::RequestLabels {
            status: "stop".into(),
        })
        .inc();
    serve
        .kv_cache_bytes
        .get_or_create(&deem_actors::runtime::metrics::ShardLabels {
            shard: "llm0".into(),
        })
        .set(0);
    // Likewise the cross-process edges (tests/distributed.rs exercises them).
    let edge = deem_actors::runtime::metrics::EdgeLabels {
        edge: "llm0: forward out".into(),
    };
    metrics.dist.p2p_bytes.get_or_create(&edge).inc_by(0);
    metrics.dist.p2p_seconds.get_or_create(&edge).inc_by(0.0);
    // Likewise the CUDA devices' allocator gauges (a GPU build on a GPU samples them).
    let device = deem_actors::runtime::metrics::DeviceLabels {
        device: "cuda:0".into(),
    };
    metrics
        .precision
        .device_allocated
        .get_or_create(&device)
        .set(0);
    metrics
        .precision
        .device_reserved
        .get_or_create(&device)
        .set(0);
    // Likewise the actor failures and restarts (the supervision tests make them).
    let vision = deem_actors::runtime::metrics::ActorLabels {
        actor: "vision".into(),
    };
    metrics.actor_failures.get_or_create(&vision).inc_by(0);
    metrics.actor_restarts.get_or_create(&vision).inc_by(0);
    let cfg = embedded_tiny();
    let topo = Topology::parse(
        deem_actors::runtime::topology::EMBEDDED_CPU,
        "cpu.toml",
        &cfg.config,
        0,
    )
    .unwrap();
    let job = deem_actors::cli::train::TrainJob {
        run_dir: scratch("monitoring"),
        steps: Some(1),
        mode: deem_actors::cli::train::Mode::Pipeline(topo),
        progress: false,
        resume: false,
        data: None,
        init_from: None,
        pretrained: vec![],
        stop_at: None,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    deem_actors::cli::train::run_job(&job, &cfg, &metrics, &rt).unwrap();
    let exported = deem_actors::runtime::metrics::to_classic_text(&metrics.encode());
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let dashboard = std::fs::read_to_string(dir.join("grafana-training.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut used = std::collections::BTreeSet::new();
    for text in [&rules, &dashboard] {
        let mut rest = text.as_str();
        while let Some(i) = rest.find(['d', 'p']) {
            let tail = &rest[i..];
            let name: String = tail
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if (name.starts_with("deem_") || name.starts_with("process_"))
                && !rest[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            {
                used.insert(name.clone());
            }
            rest = &tail[name.len().max(1)..];
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    for metric in used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| metric.strip_suffix(s))
            .unwrap_or(&metric);
        assert!(
            exported.contains(&format!("# TYPE {family} ")),
            "{metric} is used by monitoring/ but not exported"
        );
    }
}

#[test]
fn training_exports_its_metrics() {
    let dir = scratch("train-metrics");
    let cfg = embedded_tiny();
    let metrics = deem_actors::runtime::metrics::Metrics::new();
    let topo = Topology::parse(
        deem_actors::runtime::topology::EMBEDDED_CPU,
        "cpu.toml",
        &cfg.config,
        0,
    )
    .unwrap();
    let job = deem_actors::cli::train::TrainJob {
        run_dir: dir,
        steps: Some(2),
        mode: deem_actors::cli::train::Mode::Pipeline(topo),
        progress: false,
        resume: false,
        data: None,
        init_from: None,
        pretrained: vec![],
        stop_at: None,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reports = deem_actors::cli::train::run_job(&job, &cfg, &metrics, &rt).unwrap();
    let text = deem_actors::runtime::metrics::to_classic_text(&metrics.encode());
    assert!(text.contains("deem_train_steps_total 2\n"), "{text}");
    assert!(text.contains("deem_train_step_seconds_count 2\n"), "{text}");
    let scrape = scrape_text(&text);
    let loss = scrape
        .samples
        .iter()
        .find(|s| s.metric == "deem_train_loss" && s.labels.get("part") == Some("total"))
        .expect("deem_train_loss{part=total}");
    assert_eq!(loss.value, prometheus_parse::Value::Gauge(reports[1].total));
    for actor in ["vision", "llm0", "llm1", "diffusion"] {
        assert!(
            text.contains(&format!(
                "deem_train_actor_busy_seconds_total{{actor=\"{actor}\"}}"
            )),
            "{actor}: {text}"
        );
    }
    assert!(text.contains("deem_train_bubble_ratio "), "{text}");
    assert!(
        text.contains("deem_train_samples_total 8\n"),
        "2 steps × 4 rows: {text}"
    );
    let edge_bytes = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "deem_pipeline_edge_bytes_total"
                && s.labels.get("edge") == Some("llm0: llm output")
        })
        .expect("bytes on the llm0 → llm1 edge");
    // 2 steps × 4 rows × T tokens × 64 channels × 4 bytes of hidden states.
    let t = deem::data::batches::SyntheticBatches::new(&cfg.config, 0).row_len();
    assert_eq!(
        edge_bytes.value,
        prometheus_parse::Value::Counter((2 * 4 * t * 64 * 4) as f64)
    );
    promtool_check(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_a_running_training() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("prometheus not installed: skipping (CI installs the Debian package)");
        return;
    }
    let dir = scratch("prometheus");
    let (deem_port, prom_port) = (free_port(), free_port());
    let _train = Reaped(
        Command::new(env!("CARGO_BIN_EXE_deem"))
            .args(["train", "--quiet", "--steps", "400", "--run-dir"])
            .arg(dir.join("run"))
            .args(["--metrics-addr", &format!("127.0.0.1:{deem_port}")])
            .current_dir(root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: deem\n    static_configs:\n      - targets: [\"127.0.0.1:{deem_port}\"]\n"
        ),
    )
    .unwrap();
    let _prom = Reaped(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let query = format!(
        "http://127.0.0.1:{prom_port}/api/v1/query?query=deem_train_loss%7Bpart%3D%22total%22%7D"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        if let Ok(resp) = client.get(&query).send().await {
            if let Ok(body) = resp.json::<serde_json::Value>().await {
                if let Some(v) = body["data"]["result"][0]["value"][1].as_str() {
                    let loss: f64 = v.parse().unwrap();
                    assert!(loss.is_finite() && loss > 0.0, "{body}");
                    assert_eq!(body["data"]["result"][0]["metric"]["job"], "deem");
                    return;
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus never returned deem_train_loss"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

#[test]
fn a_rank_labels_every_sample_with_its_rank_and_node() {
    let m = deem_actors::runtime::metrics::Metrics::for_rank(3, "node-a");
    m.train_steps.inc();
    m.dist.allreduce_bytes.inc_by(1024);
    let text = deem_actors::runtime::metrics::to_classic_text(&m.encode());
    let samples: Vec<&str> = text.lines().filter(|l| l.starts_with("deem_")).collect();
    assert!(samples.len() >= 5, "{text}");
    for s in &samples {
        assert!(
            s.contains("rank=\"3\"") && s.contains("node=\"node-a\""),
            "{s}"
        );
    }
    assert!(text.contains("deem_allreduce_bytes_total{"), "{text}");
}
