//! The deployment files against the binary they deploy: every STREAMLINE_*
//! variable they set exists in `streamline --help`, probes and ports match
//! the routes and addresses, and the shutdown timings add up (Kubernetes,
//! compose, the Dockerfile and the nginx config). No container engine or
//! cluster runs here; the files are parsed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use serde_json::Value;
use streamline::{Config, control};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document in `text`, as JSON values.
fn yaml_docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| {
            let v = serde_norway::Value::deserialize(doc).expect("valid YAML");
            serde_json::to_value(v).expect("plain YAML")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The STREAMLINE_* variables `streamline --help` lists.
fn help_vars() -> BTreeSet<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_streamline"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let vars: BTreeSet<String> = help
        .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
        .filter(|w| w.starts_with("STREAMLINE_") && w.len() > "STREAMLINE_".len())
        .map(str::to_owned)
        .collect();
    assert!(vars.len() > 20, "found only {vars:?} in --help");
    vars
}

fn assert_known(vars: impl IntoIterator<Item = String>, source: &str) {
    let known = help_vars();
    let mut n = 0;
    for v in vars {
        assert!(
            v.starts_with("STREAMLINE_"),
            "{source}: {v} is not a STREAMLINE_* variable"
        );
        assert!(
            known.contains(&v),
            "{source} sets {v}, which `streamline --help` does not list"
        );
        n += 1;
    }
    assert!(n > 0, "{source} sets no STREAMLINE_* variable");
}

/// `KEY=VALUE` lines of an env file (comments and blanks skipped).
fn env_file(rel: &str) -> BTreeMap<String, String> {
    read(rel)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{rel}: {l:?}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// A `Config` as the binary would read these variables (flags built from
/// the names: STREAMLINE_DRAIN_WINDOW → --drain-window).
fn config_from(vars: &BTreeMap<String, String>) -> Config {
    let mut args = vec!["streamline".to_owned()];
    for (k, v) in vars {
        let flag = k["STREAMLINE_".len()..].to_lowercase().replace('_', "-");
        args.push(format!("--{flag}={v}"));
    }
    let config = Config::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    config.build().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    config
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

fn duration(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn control_paths() -> BTreeSet<String> {
    control::route_table()
        .into_iter()
        .map(|(_, p)| p.to_owned())
        .collect()
}

// ----- Kubernetes (Kustomize) -----

struct Kustomization {
    dir: PathBuf,
    docs: Vec<Value>,
    /// The configMapGenerator env files, in order (later ones merge over).
    env_files: Vec<String>,
    /// The secretGenerator literals (`KEY=VALUE`), in order.
    secret_literals: Vec<String>,
    /// The configMapGenerator `files`, by ConfigMap name.
    config_files: BTreeMap<String, Vec<String>>,
    /// `replicas:` overrides by Deployment name (outer ones win).
    replicas: BTreeMap<String, u64>,
}

fn kustomization(dir: &str) -> Kustomization {
    let k = &yaml_docs(&read(&format!("{dir}/kustomization.yaml")))[0];
    let mut docs = Vec::new();
    let mut env_files = Vec::new();
    let mut secret_literals = Vec::new();
    let mut config_files: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut replicas = BTreeMap::new();
    for r in k["resources"].as_array().expect("resources") {
        let r = r.as_str().unwrap();
        let path = root().join(dir).join(r);
        assert!(path.exists(), "{dir}: resource {r} does not exist");
        if path.is_dir() {
            let rel = format!("{dir}/{r}");
            let base = kustomization(&rel);
            docs.extend(base.docs);
            env_files.extend(base.env_files);
            secret_literals.extend(base.secret_literals);
            config_files.extend(base.config_files);
            replicas.extend(base.replicas);
        } else {
            docs.extend(yaml_docs(&read(&format!("{dir}/{r}"))));
        }
    }
    for generator in k["configMapGenerator"].as_array().into_iter().flatten() {
        for f in generator["envs"].as_array().into_iter().flatten() {
            env_files.push(format!("{dir}/{}", f.as_str().unwrap()));
        }
        for f in generator["files"].as_array().into_iter().flatten() {
            let name = generator["name"].as_str().unwrap().to_owned();
            let file = format!("{dir}/{}", f.as_str().unwrap());
            assert!(root().join(&file).exists(), "{file} does not exist");
            config_files.entry(name).or_default().push(file);
        }
    }
    for generator in k["secretGenerator"].as_array().into_iter().flatten() {
        for l in generator["literals"].as_array().into_iter().flatten() {
            secret_literals.push(l.as_str().unwrap().to_owned());
        }
    }
    for r in k["replicas"].as_array().into_iter().flatten() {
        let name = r["name"].as_str().unwrap().to_owned();
        replicas.insert(name, r["count"].as_u64().unwrap());
    }
    Kustomization {
        dir: root().join(dir),
        docs,
        env_files,
        secret_literals,
        config_files,
        replicas,
    }
}

impl Kustomization {
    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn the(&self, kind: &str, name: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.dir.display()))
    }

    /// The STREAMLINE_* settings the container gets: generated ConfigMap
    /// entries, the generated Secret's, then its own `env` (literal values
    /// only).
    fn settings(&self) -> BTreeMap<String, String> {
        let mut vars = BTreeMap::new();
        for f in &self.env_files {
            vars.extend(env_file(f));
        }
        for l in &self.secret_literals {
            let (k, v) = l.split_once('=').expect("KEY=VALUE");
            vars.insert(k.to_owned(), v.to_owned());
        }
        for e in self.container()["env"].as_array().into_iter().flatten() {
            if let Some(v) = e["value"].as_str() {
                vars.insert(e["name"].as_str().unwrap().to_owned(), v.to_owned());
            }
        }
        vars
    }

    fn deployment(&self) -> &Value {
        self.the("Deployment", "streamline")
    }

    /// How many pods the Deployment `name` runs, after `replicas:`.
    fn replicas_of(&self, name: &str) -> u64 {
        self.replicas.get(name).copied().unwrap_or_else(|| {
            self.the("Deployment", name)["spec"]["replicas"]
                .as_u64()
                .unwrap()
        })
    }

    fn container(&self) -> &Value {
        let containers = self.deployment()["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        containers
            .iter()
            .find(|c| c["name"] == "streamline")
            .expect("a container named streamline")
    }
}

const K8S: [&str; 2] = ["deploy/k8s/base", "deploy/k8s/overlays/example"];

#[test]
fn kubernetes_sets_only_variables_the_binary_reads() {
    for dir in K8S {
        let k = kustomization(dir);
        let mut vars: Vec<String> = k.container()["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect();
        for f in &k.env_files {
            vars.extend(env_file(f).into_keys());
        }
        for l in &k.secret_literals {
            vars.push(l.split_once('=').expect("KEY=VALUE").0.to_owned());
        }
        assert_known(vars, dir);
        let refs = k.container()["envFrom"].as_array().unwrap();
        assert!(
            refs.iter()
                .all(|r| r["configMapRef"]["name"] == "streamline"
                    || (r["secretRef"]["name"] == "streamline"
                        && r["secretRef"]["optional"] == true)),
            "{dir}: envFrom the generated ConfigMap and the optional Secret"
        );
        // The whole set parses and passes the binary's own checks.
        config_from(&k.settings());
    }
}

#[test]
fn kubernetes_ports_and_probes_match_the_gateway() {
    let routes = control_paths();
    for dir in K8S {
        let k = kustomization(dir);
        let config = config_from(&k.settings());
        let c = k.container();
        let ports: BTreeMap<&str, u64> = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap(),
                    p["containerPort"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            BTreeMap::from([
                ("control", u64::from(config.control_addr.port())),
                ("stream", u64::from(config.stream_addr.port())),
            ]),
            "{dir}: named ports are the configured addresses' ports"
        );
        assert!(
            config.control_addr.ip().is_unspecified(),
            "{dir}: control plane binds 0.0.0.0"
        );
        assert!(
            config.stream_addr.ip().is_unspecified(),
            "{dir}: stream plane binds 0.0.0.0"
        );

        for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/health")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"], path, "{dir}: {probe}");
            assert_eq!(get["port"], "control", "{dir}: {probe} on the control port");
            assert!(routes.contains(path), "{path} is a control route");
        }

        // Services target the named ports; the Ingress targets Services and
        // routes only public paths.
        let mut service_ports = BTreeMap::new();
        for s in k.of_kind("Service") {
            let name = s["metadata"]["name"].as_str().unwrap();
            if s["spec"]["selector"]["app.kubernetes.io/name"] != "streamline" {
                continue;
            }
            for p in s["spec"]["ports"].as_array().unwrap() {
                let target = p["targetPort"].as_str().expect("a named targetPort");
                assert!(
                    ports.contains_key(target),
                    "{dir}: Service {name} → {target}"
                );
                service_ports.insert(
                    (name.to_owned(), p["name"].as_str().unwrap().to_owned()),
                    target.to_owned(),
                );
            }
        }
        assert_eq!(service_ports.len(), 2, "{dir}: a Service port per plane");
        // Every routed path reaches its plane; stream errors are answered by
        // the come-back server, control errors pass through unchanged.
        let mut routed = BTreeSet::new();
        for ingress in k.of_kind("Ingress") {
            let name = ingress["metadata"]["name"].as_str().unwrap();
            let annotations = &ingress["metadata"]["annotations"];
            let annotation = |key: &str| {
                annotations[format!("nginx.ingress.kubernetes.io/{key}")]
                    .as_str()
                    .map(str::to_owned)
            };
            let next = annotation("proxy-next-upstream").unwrap_or_default();
            assert!(!next.contains("non_idempotent"), "{dir}: {name}");
            assert!(next.contains("error timeout"), "{dir}: {name}");
            let mut planes = BTreeSet::new();
            for rule in ingress["spec"]["rules"].as_array().unwrap() {
                for p in rule["http"]["paths"].as_array().unwrap() {
                    let path = p["path"].as_str().unwrap();
                    routed.insert(path.to_owned());
                    let svc = &p["backend"]["service"];
                    let key = (
                        svc["name"].as_str().unwrap().to_owned(),
                        svc["port"]["name"].as_str().unwrap().to_owned(),
                    );
                    let target = service_ports.get(&key).unwrap_or_else(|| {
                        panic!("{dir}: Ingress {name} {path} → unknown {key:?}")
                    });
                    planes.insert(target.clone());
                    if path == "/stream" {
                        assert_eq!(target, "stream");
                    } else {
                        assert_eq!(target, "control", "{path}");
                        assert!(
                            routes.iter().any(|r| r.starts_with(path)),
                            "{path} is a control route"
                        );
                        assert!(
                            !["/health", "/ready", "/metrics"].contains(&path),
                            "{path} is not public"
                        );
                    }
                }
            }
            assert_eq!(planes.len(), 1, "{dir}: Ingress {name} serves one plane");
            if planes.contains("stream") {
                assert_eq!(annotation("proxy-buffering").as_deref(), Some("off"));
                let read_timeout: u64 = annotation("proxy-read-timeout").unwrap().parse().unwrap();
                assert!(Duration::from_secs(read_timeout) > config.heartbeat * 4);
                for code in ["http_502", "http_503", "http_504"] {
                    assert!(next.contains(code), "{dir}: {name} retries {code}");
                }
                let tries: u64 = annotation("proxy-next-upstream-tries")
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(
                    tries == 0 || tries >= k.replicas_of("streamline"),
                    "{dir}: {name}: every replica gets a try"
                );
                // No answer EventSource treats as final: nginx's own errors
                // go to the come-back server, which answers come-back.conf.
                let codes = annotation("custom-http-errors").unwrap();
                assert_eq!(codes, "502,503,504", "{dir}: {name}");
                let backend = annotation("default-backend").unwrap();
                let svc = k.the("Service", &backend);
                let selector = &svc["spec"]["selector"];
                let deployment = k
                    .of_kind("Deployment")
                    .into_iter()
                    .find(|d| &d["spec"]["template"]["metadata"]["labels"] == selector)
                    .unwrap_or_else(|| panic!("{dir}: no pods behind {backend}"));
                let volumes = &deployment["spec"]["template"]["spec"]["volumes"];
                let map = volumes
                    .as_array()
                    .unwrap()
                    .iter()
                    .find_map(|v| v["configMap"]["name"].as_str())
                    .expect("the config from a ConfigMap");
                let files = &k.config_files[map];
                assert!(
                    files.iter().any(|f| f.ends_with("/come-back.conf")),
                    "{dir}: {backend} serves come-back.conf"
                );
                let port = svc["spec"]["ports"][0]["targetPort"].as_str().unwrap();
                let container = &deployment["spec"]["template"]["spec"]["containers"][0];
                let listens = container["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == port)
                    .expect("the Service's target port")["containerPort"]
                    .as_u64()
                    .unwrap();
                let conf = read("deploy/k8s/base/come-back.conf");
                assert!(conf.contains(&format!("listen {listens};")), "{dir}");
            } else {
                // The gateway's own JSON errors reach the publisher.
                assert_eq!(annotation("custom-http-errors"), None, "{dir}: {name}");
                assert_eq!(annotation("proxy-body-size").as_deref(), Some("1m"));
            }
        }
        assert!(
            routed.contains("/stream") && routed.contains("/events"),
            "{dir}"
        );
    }
}

#[test]
fn kubernetes_grace_period_covers_the_drain() {
    for dir in K8S {
        let k = kustomization(dir);
        let config = config_from(&k.settings());
        let spec = &k.deployment()["spec"]["template"]["spec"];
        let termination =
            Duration::from_secs(spec["terminationGracePeriodSeconds"].as_u64().unwrap());
        assert!(
            termination >= config.grace_period,
            "{dir}: terminationGracePeriodSeconds {termination:?} < --grace-period {:?}",
            config.grace_period
        );
        assert!(
            config.grace_period > config.shutdown_delay + config.drain_window,
            "{dir}: the grace period must outlast the delay and the drain"
        );
        // Readiness turns off (503) at once; the probe must notice well
        // within the shutdown delay.
        let probe = &k.container()["readinessProbe"];
        let notice = Duration::from_secs(
            probe["periodSeconds"].as_u64().unwrap() * probe["failureThreshold"].as_u64().unwrap(),
        );
        assert!(
            notice < config.shutdown_delay,
            "{dir}: readiness noticed in {notice:?}"
        );
        let pdb = k.the("PodDisruptionBudget", "streamline");
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
            "streamline"
        );
        let replicas = k.replicas_of("streamline");
        if config.redis_url.is_some() || config.kafka_brokers.is_some() {
            assert!(
                replicas >= 2,
                "{dir}: a drained replica's clients need another"
            );
        } else {
            // Replicas without a bus share no events: a client that lands
            // on another one misses what was published on the first.
            assert_eq!(replicas, 1, "{dir}: no bus, so one replica");
        }
    }
}

#[test]
fn kubernetes_pods_run_locked_down() {
    let k = kustomization(K8S[0]);
    let pod = &k.deployment()["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = k.container();
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());
    // Secrets (the Redis URL and its password) come from the Secret, never
    // from the Deployment or the ConfigMap.
    assert!(
        !c["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "STREAMLINE_REDIS_URL")
    );
    let overlay = kustomization(K8S[1]);
    assert!(
        overlay
            .env_files
            .iter()
            .all(|f| !env_file(f).contains_key("STREAMLINE_REDIS_URL"))
    );
    assert!(
        overlay
            .secret_literals
            .iter()
            .any(|l| l.starts_with("STREAMLINE_REDIS_URL=")),
        "the example's Redis URL is in its Secret"
    );
    // The come-back server too.
    let back = k.the("Deployment", "streamline-come-back");
    let pod = &back["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let sc = &pod["containers"][0]["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
}

/// The Kafka topic names a `for t in a b; do … kafka-topics.sh …` command creates.
fn created_topics(command: &str) -> BTreeSet<String> {
    let list = command
        .split("for t in ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("no `for t in …;` in {command}"));
    assert!(command.contains("kafka-topics.sh") && command.contains("--create"));
    list.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn the_example_overlay_creates_the_kafka_topics_it_streams() {
    let k = kustomization(K8S[1]);
    let settings = k.settings();
    let config = config_from(&settings);
    let brokers = config
        .kafka_brokers
        .clone()
        .expect("the example uses Kafka");
    let job = k.the("Job", "kafka-topics");
    let command = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
        .as_str()
        .unwrap();
    let created = created_topics(command);
    assert!(command.contains(&format!("--bootstrap-server {brokers}")));
    for topic in &config.kafka_topics {
        let kafka_topic = topic.split_once('=').map_or(topic.as_str(), |(k, _)| k);
        assert!(
            created.contains(kafka_topic),
            "{kafka_topic} not created: {created:?}"
        );
    }
    // The broker's Service is what STREAMLINE_KAFKA_BROKERS names.
    let (host, port) = brokers.split_once(':').unwrap();
    let service = k.the("Service", host);
    assert_eq!(
        service["spec"]["ports"][0]["port"].as_u64(),
        Some(port.parse().unwrap())
    );
}

// ----- Containers -----

/// The Dockerfile's `ENV` settings of the runtime stage and its `EXPOSE`d ports.
fn dockerfile() -> (BTreeMap<String, String>, BTreeSet<u64>, String) {
    let text = read("deploy/docker/Dockerfile").replace("\\\n", " ");
    let runtime = text.rsplit("\nFROM ").next().unwrap();
    let (mut env, mut expose, mut user) = (BTreeMap::new(), BTreeSet::new(), String::new());
    for line in runtime.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("ENV ") {
            for kv in rest.split_whitespace() {
                let (k, v) = kv.split_once('=').expect("ENV KEY=VALUE");
                env.insert(k.to_owned(), v.to_owned());
            }
        } else if let Some(rest) = line.strip_prefix("EXPOSE ") {
            expose.extend(rest.split_whitespace().map(|p| p.parse::<u64>().unwrap()));
        } else if let Some(rest) = line.strip_prefix("USER ") {
            user = rest.trim().to_owned();
        }
    }
    (env, expose, user)
}

#[test]
fn the_image_listens_on_what_it_exposes() {
    let (env, expose, user) = dockerfile();
    assert_known(env.keys().cloned(), "Dockerfile");
    let config = config_from(&env);
    assert!(config.control_addr.ip().is_unspecified() && config.stream_addr.ip().is_unspecified());
    assert_eq!(
        expose,
        BTreeSet::from([
            u64::from(config.control_addr.port()),
            u64::from(config.stream_addr.port())
        ])
    );
    let uid = user.split(':').next().unwrap();
    assert!(
        !uid.is_empty() && uid != "0" && uid != "root",
        "runs as non-root: {user:?}"
    );
    // The Kubernetes pod's user is the image's.
    let k = kustomization(K8S[0]);
    let pod_uid = &k.deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"];
    assert_eq!(pod_uid.to_string(), uid);
}

#[test]
fn compose_matches_the_binary_the_image_and_nginx() {
    let compose = &yaml_docs(&read("deploy/docker/compose.yaml"))[0];
    let services = compose["services"].as_object().unwrap();
    let (image_env, _, _) = dockerfile();
    let nginx_conf = read("deploy/nginx/streamline.conf");
    let mut replicas = Vec::new();
    let mut kafka_topics_seen = Vec::new();
    for (name, s) in services {
        let Some(env) = s["environment"].as_object() else {
            continue;
        };
        if !env.keys().any(|k| k.starts_with("STREAMLINE_")) {
            continue;
        }
        replicas.push(name.clone());
        assert_known(env.keys().cloned(), &format!("compose service {name}"));
        let mut settings = image_env.clone();
        settings.extend(
            env.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())),
        );
        let config = config_from(&settings);
        kafka_topics_seen.push((
            name.clone(),
            config.kafka_brokers.clone(),
            config.kafka_topics.clone(),
        ));
        // nginx reaches this replica at its service name and ports.
        for addr in [config.control_addr, config.stream_addr] {
            let line = format!("server {name}:{} ", addr.port());
            assert!(nginx_conf.contains(&line), "streamline.conf lacks `{line}`");
        }
        let stop = duration(s["stop_grace_period"].as_str().expect("stop_grace_period"));
        assert!(
            stop >= config.grace_period,
            "{name}: stop_grace_period < --grace-period"
        );
        for published in s["ports"].as_array().into_iter().flatten() {
            let container = port_of(published.as_str().unwrap());
            assert_eq!(
                container,
                u64::from(config.control_addr.port()),
                "{name} publishes its control port"
            );
        }
    }
    assert_eq!(replicas.len(), 2, "two replicas: {replicas:?}");
    let nginx = &services["nginx"];
    let mount = nginx["volumes"][0].as_str().unwrap();
    let (src, dst) = mount.split_once(':').unwrap();
    assert!(root().join("deploy/docker").join(src).exists(), "{src}");
    assert!(dst.starts_with("/etc/nginx/conf.d/"), "{dst}");
    let listen = nginx_conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("listen "))
        .unwrap()
        .trim_end_matches(';');
    let published = nginx["ports"][0].as_str().unwrap();
    assert_eq!(
        port_of(published),
        port_of(listen),
        "nginx publishes its listen port"
    );
    assert!(services.contains_key("redis"));
    // Kafka is the bus: every replica reads the compose broker, and the
    // topics it streams are the ones the init service creates (Streamline
    // creates none, and the broker does not auto-create them).
    let create = services["kafka-topics"]["command"][0]
        .as_str()
        .expect("kafka-topics runs one shell command")
        .to_owned();
    let kafka = &services["kafka"]["environment"];
    let advertised = kafka["KAFKA_ADVERTISED_LISTENERS"].as_str().unwrap();
    for (name, brokers, topics) in kafka_topics_seen {
        let brokers = brokers.unwrap_or_else(|| panic!("{name} sets no STREAMLINE_KAFKA_BROKERS"));
        for broker in brokers.split(',') {
            assert!(
                advertised.contains(&format!("//{broker}")),
                "{name}: {broker} is not a listener the broker advertises ({advertised})"
            );
        }
        assert!(!topics.is_empty(), "{name} streams no Kafka topic");
        for topic in topics {
            let kafka_topic = topic.split_once('=').map_or(topic.as_str(), |(k, _)| k);
            assert!(
                created_topics(&create).contains(kafka_topic),
                "{name} streams {kafka_topic}, which kafka-topics does not create"
            );
        }
    }
    assert_eq!(kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"], "false");
}

// ----- nginx -----

/// The directives of the `location {pattern} { … }` block.
fn location<'a>(conf: &'a str, pattern: &str) -> &'a str {
    let start = conf
        .find(&format!("location {pattern} {{"))
        .unwrap_or_else(|| panic!("no location {pattern}"));
    let block = &conf[start..];
    &block[..block.find("\n    }").unwrap()]
}

#[test]
fn nginx_settings_match_the_gateway() {
    // Directives only: comments dropped.
    let shipped = read("deploy/nginx/streamline.conf");
    let conf: Vec<&str> = shipped
        .lines()
        .map(|l| l.split('#').next().unwrap())
        .collect();
    let conf = conf.join("\n");
    let defaults = Config::defaults();
    assert!(conf.contains("client_max_body_size 1m;"));
    assert_eq!(
        defaults.max_body,
        1024 * 1024,
        "client_max_body_size follows --max-body"
    );
    let stream = location(&conf, "= /stream");
    for directive in [
        "proxy_buffering off;",
        "gzip off;",
        "proxy_next_upstream error timeout http_502 http_503 http_504;",
        // The last replica's 503 too, so that error_page can replace it.
        "proxy_intercept_errors on;",
        "error_page 502 503 504 = @stream_unavailable;",
    ] {
        assert!(stream.contains(directive), "/stream lacks {directive}");
    }
    // No passive health checks: a mark set by a draining replica's 503 is
    // cleared only by a probe request that completes, which a stream never
    // does (then nginx answers 502 "no live upstreams").
    let servers: Vec<&str> = conf
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("server ") && l.ends_with(';'))
        .collect();
    assert!(servers.len() >= 4, "{servers:?}");
    for line in servers {
        assert!(line.ends_with(" max_fails=0;"), "{line}");
    }
    // With no replica up: an event stream that ends at once, with retry:,
    // the same answer the Kubernetes come-back server gives.
    let come_back = location(&conf, "@stream_unavailable");
    assert!(come_back.contains("default_type text/event-stream;"));
    assert!(come_back.contains("Cache-Control \"no-store\""));
    let body = |conf: &str| -> String {
        conf.lines()
            .find_map(|l| l.trim().strip_prefix("return 200 "))
            .expect("a return 200")
            .to_owned()
    };
    assert!(body(come_back).contains("retry: "));
    assert_eq!(
        body(come_back),
        body(&read("deploy/k8s/base/come-back.conf")),
        "nginx and the Kubernetes come-back server say the same"
    );
    let control_unavailable = location(&conf, "@control_unavailable");
    assert!(control_unavailable.contains("default_type application/json;"));
    assert!(control_unavailable.contains("Retry-After"));
    let timeout = stream
        .lines()
        .find_map(|l| l.trim().strip_prefix("proxy_read_timeout "))
        .unwrap()
        .trim_end_matches(';');
    assert!(
        duration(timeout) > defaults.heartbeat * 4,
        "read timeout {timeout}"
    );
    assert!(!conf.contains("non_idempotent"), "a PATCH is never resent");
    for directive in [
        "proxy_http_version 1.1;",
        "proxy_set_header Connection \"\";",
        "keepalive ",
    ] {
        assert!(conf.contains(directive), "{directive}");
    }
    assert!(location(&conf, "~ ^/(health|ready|metrics)$").contains("deny all;"));
    // Mercure on one origin: subscriptions are streams, publishes go to the
    // control plane's route, treated as /events is.
    let mercure = location(&conf, "= /.well-known/mercure");
    for directive in [
        "proxy_pass http://streamline_stream;",
        "proxy_buffering off;",
        "proxy_next_upstream error timeout http_502 http_503 http_504;",
        "proxy_intercept_errors on;",
        "error_page 502 503 504 = @stream_unavailable;",
        "rewrite ^ /.well-known/mercure/publish last;",
    ] {
        assert!(mercure.contains(directive), "Mercure lacks {directive}");
    }
    let publish = location(&conf, "= /.well-known/mercure/publish");
    assert!(publish.contains("internal;"));
    assert!(publish.contains("proxy_pass http://streamline_control/.well-known/mercure;"));
    assert!(publish.contains("error_page 502 503 504 = @control_unavailable;"));
    assert!(control_paths().contains(streamline::mercure::PATH));
    let routes = control_paths();
    for public in ["= /events", "= /clients", "/clients/", "= /topics"] {
        let path = public.trim_start_matches("= ");
        assert!(
            routes.iter().any(|r| r.starts_with(path)),
            "{path} is a control route"
        );
        let block = location(&conf, public);
        assert!(block.contains("proxy_pass http://streamline_control;"));
        assert!(block.contains("error_page 502 503 504 = @control_unavailable;"));
    }
}
