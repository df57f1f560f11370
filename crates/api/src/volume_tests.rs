//! Parsing and validation of pod volumes, volume mounts and
//! PersistentVolumeClaims: every refusal names its path.

use crate::parse::{Format, Object, parse_objects, parse_pod, parse_volume};
use crate::validate::validate_pod;
use crate::volume::{EmptyDirVolumeSource, PersistentVolumeClaimVolumeSource, Volume, VolumeMount};
use crate::{Container, Pod, Quantity};

const POD: &str = "
apiVersion: v1
kind: Pod
metadata:
  name: db
spec:
  containers:
  - name: main
    image: registry.local/postgres:16
    volumeMounts:
    - name: data
      mountPath: /var/lib/postgresql
      subPath: pgdata
    - name: scratch
      mountPath: /tmp/scratch
      readOnly: true
  volumes:
  - name: data
    persistentVolumeClaim:
      claimName: db-data
  - name: scratch
    emptyDir:
      medium: Memory
      sizeLimit: 64Mi
";

const PVC: &str = "
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: db-data
  annotations:
    podvisor.io/encrypted: 'true'
spec:
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 1Gi
";

fn problems(p: &Pod) -> Vec<String> {
    validate_pod(p)
        .err()
        .unwrap_or_default()
        .iter()
        .map(|e| e.to_string())
        .collect()
}

fn has(all: &[String], want: &str) {
    assert!(
        all.iter().any(|e| e.contains(want)),
        "missing {want:?} in {all:#?}"
    );
}

fn pod_with(volumes: Vec<Volume>, mounts: Vec<VolumeMount>) -> Pod {
    let mut p = Pod::new(
        "p",
        vec![Container {
            name: "c".into(),
            image: "busybox".into(),
            volume_mounts: mounts,
            ..Default::default()
        }],
    );
    p.spec.volumes = volumes;
    p
}

fn claim(name: &str, claim: &str) -> Volume {
    Volume {
        name: name.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.into(),
            read_only: false,
        }),
        ..Default::default()
    }
}

fn empty(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, sub: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: false,
        sub_path: sub.into(),
    }
}

#[test]
fn volumes_and_mounts_are_read() {
    let pod = parse_pod(POD, Format::Yaml).unwrap();
    assert_eq!(pod.spec.claims(), vec!["db-data"]);
    let c = &pod.spec.containers[0];
    assert_eq!(c.volume_mounts[0].sub_path, "pgdata");
    assert!(c.volume_mounts[1].read_only);
    let scratch = pod.spec.volumes[1].empty_dir.as_ref().unwrap();
    assert_eq!(scratch.medium, "Memory");
    assert_eq!(scratch.size_limit, Some(Quantity::new("64Mi")));
    let json = serde_json::to_value(&pod).unwrap();
    assert_eq!(
        json["spec"]["volumes"][0],
        serde_json::json!({"name": "data", "persistentVolumeClaim": {"claimName": "db-data"}})
    );
    assert_eq!(
        json["spec"]["containers"][0]["volumeMounts"][0],
        serde_json::json!({"name": "data", "mountPath": "/var/lib/postgresql", "subPath": "pgdata"})
    );
    assert_eq!(parse_pod(&json.to_string(), Format::Json).unwrap(), pod);
}

#[test]
fn other_volume_sources_are_not_supported() {
    for source in [
        "hostPath: {path: /etc}",
        "configMap: {name: x}",
        "secret: {secretName: x}",
        "nfs: {server: a, path: /}",
    ] {
        let key = source.split(':').next().unwrap();
        let yaml = POD.replace(
            "    emptyDir:\n      medium: Memory\n      sizeLimit: 64Mi\n",
            &format!("    {source}\n"),
        );
        let err = parse_pod(&yaml, Format::Yaml).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("spec.volumes[1].{key}: not supported by podvisor")),
            "{err}"
        );
    }
    let yaml = POD.replace(
        "      subPath: pgdata\n",
        "      mountPropagation: Bidirectional\n",
    );
    let err = parse_pod(&yaml, Format::Yaml).unwrap_err().to_string();
    assert!(
        err.starts_with(
            "spec.containers[0].volumeMounts[0].mountPropagation: not supported by podvisor"
        ),
        "{err}"
    );
}

#[test]
fn volume_refusals_name_their_paths() {
    let mut bad_medium = empty("medium");
    bad_medium.empty_dir.as_mut().unwrap().medium = "HugePages".into();
    let mut zero = empty("zero");
    zero.empty_dir.as_mut().unwrap().size_limit = Some(Quantity::new("0"));
    let mut both = claim("both", "x");
    both.empty_dir = Some(EmptyDirVolumeSource::default());
    let volumes = vec![
        empty("Bad_Name"),
        empty("dup"),
        empty("dup"),
        Volume {
            name: "none".into(),
            ..Default::default()
        },
        both,
        bad_medium,
        zero,
        claim("c1", "Not_A_Claim"),
        claim("c2", "same"),
        claim("c3", "same"),
    ];
    let e = problems(&pod_with(volumes, vec![]));
    has(&e, "spec.volumes[0].name: \"Bad_Name\" is not a valid name");
    has(
        &e,
        "spec.volumes[2].name: \"dup\" is the name of another volume of this pod",
    );
    has(
        &e,
        "spec.volumes[3]: must have exactly one source: emptyDir or persistentVolumeClaim (none given)",
    );
    has(
        &e,
        "spec.volumes[4]: must have exactly one source: emptyDir or persistentVolumeClaim (both given)",
    );
    has(
        &e,
        "spec.volumes[5].emptyDir.medium: \"HugePages\" is not supported",
    );
    has(
        &e,
        "spec.volumes[6].emptyDir.sizeLimit: must be more than 0",
    );
    has(
        &e,
        "spec.volumes[7].persistentVolumeClaim.claimName: \"Not_A_Claim\" is not a valid name",
    );
    has(
        &e,
        "spec.volumes[9].persistentVolumeClaim.claimName: \"same\" is already volume spec.volumes[8]",
    );
    assert_eq!(e.len(), 8, "{e:#?}");
}

#[test]
fn mount_refusals_name_their_paths() {
    let mounts = vec![
        mount("nope", "/a", ""),
        mount("v", "relative", ""),
        mount("v", "/a/../b", ""),
        mount("v", "/", ""),
        mount("v", "/data", ""),
        mount("v", "/data/", ""),
        mount("v", "/c", "/abs"),
        mount("v", "/d", "x/../../y"),
        mount("", "/e", ""),
    ];
    let e = problems(&pod_with(vec![empty("v")], mounts));
    let at = "spec.containers[0].volumeMounts";
    has(
        &e,
        &format!("{at}[0].name: \"nope\" is not a volume of this pod"),
    );
    has(
        &e,
        &format!("{at}[1].mountPath: \"relative\" must be an absolute path"),
    );
    has(
        &e,
        &format!("{at}[2].mountPath: \"/a/../b\" must not contain '..'"),
    );
    has(&e, &format!("{at}[3].mountPath: must not be \"/\""));
    has(
        &e,
        &format!("{at}[5].mountPath: \"/data/\" is mounted twice in this container"),
    );
    has(
        &e,
        &format!("{at}[6].subPath: \"/abs\" must be a relative path"),
    );
    has(
        &e,
        &format!("{at}[7].subPath: \"x/../../y\" must not contain '..'"),
    );
    has(&e, &format!("{at}[8].name: must not be empty"));
    assert_eq!(e.len(), 8, "{e:#?}");
    // The same path in two containers is fine; `..` inside a name is too.
    let mut p = pod_with(vec![empty("v")], vec![mount("v", "/data", "a..b")]);
    let mut second = p.spec.containers[0].clone();
    second.name = "d".into();
    p.spec.containers.push(second);
    assert!(validate_pod(&p).is_ok(), "{:?}", problems(&p));
}

#[test]
fn volume_counts_are_limited() {
    let many: Vec<Volume> = (0..17)
        .map(|i| claim(&format!("v{i}"), &format!("c{i}")))
        .collect();
    let e = problems(&pod_with(many, vec![]));
    has(
        &e,
        "spec.volumes: has 17 persistentVolumeClaim volumes: podvisor allows at most 16 per pod",
    );
    let many: Vec<Volume> = (0..65).map(|i| empty(&format!("v{i}"))).collect();
    let e = problems(&pod_with(many, vec![]));
    has(
        &e,
        "spec.volumes: has 65 volumes: podvisor allows at most 64 per pod",
    );
    let ok: Vec<Volume> = (0..16)
        .map(|i| claim(&format!("c{i}"), &format!("c{i}")))
        .chain((0..48).map(|i| empty(&format!("e{i}"))))
        .collect();
    assert!(validate_pod(&pod_with(ok, vec![])).is_ok());
}

#[test]
fn a_claim_is_read_and_checked() {
    let pvc = parse_volume(PVC, Format::Yaml).unwrap();
    assert!(pvc.wants_encryption());
    assert_eq!(pvc.size_bytes(), 1 << 30);
    assert_eq!(pvc.metadata.namespace(), "default");
    // Status is read (the server ignores it on create).
    let with_status = format!("{PVC}status:\n  phase: Bound\n");
    assert_eq!(
        parse_volume(&with_status, Format::Yaml)
            .unwrap()
            .status
            .phase,
        "Bound"
    );

    let bad = "
apiVersion: v2
kind: PersistentVolumeClaim
metadata:
  name: Bad.Name
  annotations:
    podvisor.io/encrypted: 'yes'
spec:
  accessModes: [ReadWriteOnce, ReadWriteMany, ReadOnlyMany]
  volumeMode: Block
  storageClassName: fast-ssd
  resources:
    requests:
      storage: 512Ki
      cpu: '1'
";
    let err = parse_volume(bad, Format::Yaml).unwrap_err().to_string();
    for want in [
        "apiVersion: \"v2\" is not supported",
        "metadata.name: \"Bad.Name\" is not a valid name",
        "metadata.annotations[podvisor.io/encrypted]: \"yes\" must be \"true\" or \"false\"",
        "spec.accessModes[1]: \"ReadWriteMany\" is not supported: a podvisor volume is attached to one pod at a time",
        "spec.accessModes[2]: \"ReadOnlyMany\" is not supported",
        "spec.volumeMode: \"Block\" is not supported",
        "spec.storageClassName: \"fast-ssd\" is not a storage class of podvisor",
        "spec.resources.requests.cpu: not supported by podvisor",
        "spec.resources.requests.storage: 512Ki is less than the smallest volume, 1Mi",
    ] {
        assert!(err.contains(want), "{want}\n{err}");
    }
    let huge = PVC.replace("storage: 1Gi", "storage: 17Ti");
    let err = parse_volume(&huge, Format::Yaml).unwrap_err().to_string();
    assert!(
        err.contains("spec.resources.requests.storage: 17Ti is more than the largest volume, 16Ti"),
        "{err}"
    );
    let none = PVC.replace("      storage: 1Gi\n", "");
    let err = parse_volume(&none, Format::Yaml).unwrap_err().to_string();
    assert!(
        err.contains("spec.resources.requests.storage: is required"),
        "{err}"
    );
    for class in ["''", "podvisor"] {
        let ok = PVC.replace(
            "spec:\n",
            &format!("spec:\n  storageClassName: {class}\n  volumeMode: Filesystem\n"),
        );
        assert!(parse_volume(&ok, Format::Yaml).is_ok(), "{class}");
    }
    let unknown = PVC.replace("spec:\n", "spec:\n  selector: {}\n");
    let err = parse_volume(&unknown, Format::Yaml)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("spec.selector: not supported by podvisor"),
        "{err}"
    );
}

#[test]
fn a_claim_spec_is_immutable_and_not_resized() {
    let pvc = parse_volume(PVC, Format::Yaml).unwrap();
    let mut same = pvc.clone();
    same.metadata.labels.insert("a".into(), "b".into());
    assert_eq!(same.change_problem(&pvc), None);
    let mut same_size = pvc.clone();
    same_size
        .spec
        .resources
        .requests
        .insert("storage".into(), Quantity::new("1024Mi"));
    assert_eq!(same_size.change_problem(&pvc), None);
    let mut bigger = pvc.clone();
    bigger
        .spec
        .resources
        .requests
        .insert("storage".into(), Quantity::new("2Gi"));
    let p = bigger.change_problem(&pvc).unwrap();
    assert!(p.contains("resizing is not supported"), "{p}");
    let mut other = pvc.clone();
    other.spec.storage_class_name = Some("podvisor".into());
    assert!(other.change_problem(&pvc).unwrap().contains("immutable"));
    let mut plain = pvc.clone();
    plain.metadata.annotations.clear();
    assert!(
        plain
            .change_problem(&pvc)
            .unwrap()
            .contains("plain and encrypted")
    );
}

#[test]
fn a_file_may_mix_claims_and_pods() {
    let text = format!("{POD}---\n{PVC}");
    let objects = parse_objects(&text, Format::Yaml).unwrap();
    assert!(matches!(&objects[0], Object::Pod(p) if p.metadata.name == "db"));
    assert!(
        matches!(&objects[1], Object::PersistentVolumeClaim(v) if v.metadata.name == "db-data")
    );
    let bad = format!("{POD}---\n{}", PVC.replace("storage: 1Gi", "storage: lots"));
    let err = parse_objects(&bad, Format::Yaml).unwrap_err().to_string();
    assert!(err.contains("spec.resources.requests.storage"), "{err}");
    let err = parse_objects("kind: Service\nmetadata: {name: a}\n", Format::Yaml)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("kind: \"Service\" is not supported by podvisor"),
        "{err}"
    );
    let json = serde_json::to_string(&parse_volume(PVC, Format::Yaml).unwrap()).unwrap();
    assert!(matches!(
        &parse_objects(&json, Format::Json).unwrap()[0],
        Object::PersistentVolumeClaim(_)
    ));
}
