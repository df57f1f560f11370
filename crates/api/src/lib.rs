//! podvisor's cluster API, shared by the server, the host daemons and the
//! CLI: the object model (pods, hosts, images, with Kubernetes' JSON field
//! names), Pod YAML/JSON parsing and validation (a field podvisor does not
//! support is an error naming its path), resource quantities, and the REST
//! [`Client`]. It depends on no other podvisor crate.

pub mod client;
mod duration;
mod hibernate;
mod host;
mod image;
mod meta;
pub mod nesting;
pub mod parse;
mod pod;
pub mod quantity;
mod sharing;
mod status;
pub mod validate;
mod volume;
#[cfg(test)]
mod volume_tests;

pub use client::{Applied, Client, ClientError, LogOptions, LogStream, PodFilter};
pub use duration::parse_duration;
pub use hibernate::{HIBERNATE_AFTER_ANNOTATION, hibernate_after};
pub use host::{
    ENDPOINT_TOKEN_HEADER, Host, HostCapacity, HostKsm, HostList, HostReport, HostSpec, HostStatus,
    validate_endpoint_token,
};
pub use image::{Image, ImageList};
pub use meta::{DEFAULT_NAMESPACE, ListMeta, ObjectMeta, Time};
pub use parse::{
    Format, Object, ParseError, parse_any, parse_object, parse_objects, parse_pod, parse_pods,
    parse_volume,
};
pub use pod::{
    Container, ContainerPort, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, DEFAULT_POD_MEMORY, DEFAULT_POD_MILLICORES, DnsPolicy,
    EnvVar, HIBERNATED_CONDITION, HostAlias, HostPort, Pod, PodCondition, PodDnsConfig,
    PodDnsConfigOption, PodIp, PodList, PodPhase, PodSpec, PodStatus, Protocol, ResourceList,
    ResourceRequirements, Resources, RestartPolicy, RuntimeProfile, labels_text,
};
pub use quantity::{Quantity, QuantityError};
pub use sharing::{ISOLATED_ANNOTATION, RUNTIME_PROFILE_ANNOTATION, isolated, runtime_profile};
pub use status::{EventType, Status, WatchEvent};
pub use validate::{FieldError, validate_host, validate_pod, validate_volume};
pub use volume::{
    ENCRYPTED_ANNOTATION, EmptyDirVolumeSource, PersistentVolumeClaim, PersistentVolumeClaimList,
    PersistentVolumeClaimSpec, PersistentVolumeClaimStatus, PersistentVolumeClaimVolumeSource,
    PodInstance, RefusedVolume, ReleasedVolume, Volume, VolumeAttachment, VolumeAuditEntry,
    VolumeAuditLog, VolumeKeyRequest, VolumeKeyResponse, VolumeMount, VolumeResourceRequirements,
};
