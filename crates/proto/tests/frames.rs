use podvisor_proto::frame::{HEADER_LEN, MAGIC};
use podvisor_proto::*;

fn spec() -> HostMessage {
    HostMessage::StartContainer(ContainerSpec {
        id: "c0".into(),
        hostname: "pod".into(),
        mounts: image_mounts(&["pvl0".into(), "pvl1".into()]),
        process: ProcessSpec {
            args: vec!["echo".into(), "hi".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: "1000:1000".into(),
            terminal: Some(TerminalSize { rows: 24, cols: 80 }),
            stdin: true,
        },
        runtime: None,
    })
}

fn network() -> NetworkConfig {
    let v4 = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    NetworkConfig {
        interfaces: vec![InterfaceConfig {
            mac: "02:42:ac:11:00:02".parse().unwrap(),
            current_mac: Some("02:00:00:00:00:01".parse().unwrap()),
            name: "eth0".into(),
            mtu: 1450,
            addresses: vec![
                IpPrefix {
                    address: v4("10.88.0.5"),
                    prefix_len: 16,
                },
                IpPrefix {
                    address: v4("fd00::5"),
                    prefix_len: 64,
                },
            ],
            up: true,
        }],
        routes: vec![RouteConfig {
            destination: IpPrefix {
                address: v4("0.0.0.0"),
                prefix_len: 0,
            },
            gateway: Some(v4("10.88.0.1")),
            interface: "eth0".into(),
        }],
        dns: DnsConfig {
            nameservers: vec![v4("10.88.0.1")],
            search: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        },
        hosts: vec![HostsEntry {
            address: v4("10.88.0.5"),
            names: vec!["web-0".into()],
        }],
    }
}

#[test]
fn mac_addresses_parse_and_print_as_cni_writes_them() {
    let mac: MacAddr = "02:42:AC:11:00:0f".parse().unwrap();
    assert_eq!(mac, MacAddr([0x02, 0x42, 0xac, 0x11, 0x00, 0x0f]));
    assert_eq!(mac.to_string(), "02:42:ac:11:00:0f");
    for bad in [
        "",
        "02:42:ac:11:00",
        "02:42:ac:11:00:0f:00",
        "2:42:ac:11:00:0f",
        "02-42-ac-11-00-0f",
        "zz:42:ac:11:00:0f",
    ] {
        let err = bad.parse::<MacAddr>().unwrap_err();
        assert!(err.contains("invalid MAC address"), "{bad}: {err}");
    }
}

/// Mounts beside an image's plain disks: a DAX layer (erofs on a pmem
/// device), a tmpfs and a bind of a shared mount.
fn future_mounts() -> Vec<Mount> {
    vec![
        Mount::layer_pmem("pvp0", "01234567-89ab-cdef-0123-456789abcdef"),
        Mount::overlay_root(vec!["pvp0".into()]),
        Mount {
            source: MountSource::Anonymous,
            fstype: "tmpfs".into(),
            target: MountTarget::Container {
                path: "/tmp".into(),
            },
            options: vec!["size=64m".into(), "mode=1777".into(), "nosuid".into()],
            read_only: false,
        },
        Mount {
            source: MountSource::Shared {
                name: "pvp0".into(),
            },
            fstype: "bind".into(),
            target: MountTarget::Container {
                path: "/srv/data".into(),
            },
            options: vec![],
            read_only: true,
        },
    ]
}

#[test]
fn an_image_is_its_layers_then_the_overlay_root_over_them() {
    let mounts = image_mounts(&["pvl0".into(), "pvl1".into()]);
    assert_eq!(mounts.len(), 3);
    for (m, serial) in mounts.iter().zip(["pvl0", "pvl1"]) {
        assert_eq!(
            m.source,
            MountSource::Disk {
                serial: serial.into()
            }
        );
        assert_eq!(m.fstype, "erofs");
        assert!(m.read_only);
        assert_eq!(m.shared_name(), Some(serial));
    }
    assert_eq!(mounts[2].target, MountTarget::Root);
    assert_eq!(
        mounts[2].source,
        MountSource::Overlay {
            lower: vec!["pvl0".into(), "pvl1".into()]
        }
    );
    assert!(!mounts[2].read_only);
}

#[test]
fn a_pmem_image_is_its_dax_layers_then_the_overlay_root_over_them() {
    let layers = [
        (
            "pvl0".to_string(),
            "00000000-0000-0000-0000-000000000000".to_string(),
        ),
        (
            "pvl1".to_string(),
            "11111111-1111-1111-1111-111111111111".to_string(),
        ),
    ];
    let mounts = pmem_image_mounts(&layers);
    assert_eq!(mounts.len(), 3);
    for (m, (name, uuid)) in mounts.iter().zip(&layers) {
        assert_eq!(m.source, MountSource::Pmem { uuid: uuid.clone() });
        assert_eq!(m.fstype, "erofs");
        assert_eq!(m.options, ["dax=always"]);
        assert!(m.read_only);
        assert_eq!(m.shared_name(), Some(name.as_str()));
    }
    assert_eq!(
        mounts[2],
        Mount::overlay_root(vec!["pvl0".into(), "pvl1".into()])
    );
}

#[test]
fn messages_round_trip_through_frames() {
    let msgs = vec![
        spec(),
        HostMessage::Stdin {
            id: "c0".into(),
            data: vec![0, 1, 255],
        },
        HostMessage::Shutdown { grace_ms: 10 },
        HostMessage::Exec(ExecSpec {
            id: "exec.1".into(),
            container: "c0".into(),
            process: ProcessSpec {
                args: vec!["sh".into()],
                env: vec![],
                cwd: "/".into(),
                user: String::new(),
                terminal: Some(TerminalSize { rows: 24, cols: 80 }),
                stdin: true,
            },
        }),
        HostMessage::ListProcesses,
        HostMessage::Identity(CloneIdentity {
            hostname: "clone-1".into(),
            unix_time_ns: 1_700_000_000_123_456_789,
            entropy: vec![7; 64],
        }),
        HostMessage::MountShared {
            mounts: vec![Mount::layer("pvl0")],
        },
        HostMessage::ConfigureNetwork(network()),
        HostMessage::StartContainer(ContainerSpec {
            id: "c1".into(),
            hostname: "pod".into(),
            mounts: future_mounts(),
            process: ProcessSpec {
                args: vec!["sh".into()],
                env: vec![],
                cwd: "/".into(),
                user: String::new(),
                terminal: None,
                stdin: false,
            },
            runtime: None,
        }),
    ];
    let mut wire = Vec::new();
    for m in &msgs {
        wire.extend(encode(m).unwrap());
    }
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    // Feed one byte at a time: framing must not depend on read boundaries.
    for b in wire {
        dec.push(&[b]);
        while let Some(m) = dec.next_message::<HostMessage>().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, msgs);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn garbage_is_rejected_at_once() {
    let mut dec = FrameDecoder::new();
    dec.push(b"hello agent");
    let err = dec.next_message::<GuestMessage>().unwrap_err();
    assert!(matches!(err, ProtoError::BadMagic(_)), "{err}");
    assert!(err.to_string().contains("not a podvisor agent"));
    // Stays failed: the stream has lost its framing.
    dec.push(
        &encode(&GuestMessage::Error {
            message: "x".into(),
        })
        .unwrap(),
    );
    assert!(dec.next_message::<GuestMessage>().is_err());
}

#[test]
fn oversized_frame_is_rejected_from_its_header() {
    let mut header = Vec::from(MAGIC);
    header.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut dec = FrameDecoder::new();
    dec.push(&header);
    let err = dec.next_message::<GuestMessage>().unwrap_err();
    assert_eq!(
        err,
        ProtoError::Oversized {
            len: u32::MAX as usize,
            limit: MAX_PAYLOAD
        }
    );
}

#[test]
fn foreign_version_is_rejected() {
    let mut frame = encode(&GuestMessage::Error {
        message: "x".into(),
    })
    .unwrap();
    frame[2..4].copy_from_slice(&99u16.to_be_bytes());
    let mut dec = FrameDecoder::new();
    dec.push(&frame);
    let err = dec.next_message::<GuestMessage>().unwrap_err();
    assert_eq!(
        err,
        ProtoError::Version {
            got: 99,
            want: PROTOCOL_VERSION
        }
    );
}

#[test]
fn undecodable_payload_is_malformed() {
    // A well-formed header around a payload that is not a GuestMessage.
    let payload = [200u8, 1, 2, 3];
    let mut frame = Vec::from(MAGIC);
    frame.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    assert_eq!(frame.len(), HEADER_LEN + payload.len());
    let mut dec = FrameDecoder::new();
    dec.push(&frame);
    let err = dec.next_message::<GuestMessage>().unwrap_err();
    assert!(matches!(err, ProtoError::Malformed { len: 4, .. }), "{err}");
}

#[test]
fn huge_declared_vector_inside_a_small_frame_does_not_allocate_it() {
    // Output { id: "", stream: Stdout, data: <claims 2^60 bytes> }
    let mut payload = vec![3u8, 0, 0];
    payload.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]);
    let mut frame = Vec::from(MAGIC);
    frame.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    let mut dec = FrameDecoder::new();
    dec.push(&frame);
    assert!(matches!(
        dec.next_message::<GuestMessage>(),
        Err(ProtoError::Malformed { .. })
    ));
}

#[test]
fn exit_status_maps_to_shell_codes() {
    assert_eq!(ExitStatus::Code(3).shell_code(), 3);
    assert_eq!(
        ExitStatus::Signaled {
            signal: 9,
            core_dumped: false
        }
        .shell_code(),
        137
    );
    assert_eq!(StartErrorKind::NotFound.exit_code(), 127);
}

/// A host that adopts a VM may join the agent's stream in the middle of a
/// frame: after `resynchronize` the decoder skips to the first frame that
/// decodes, then is strict again.
#[test]
fn resynchronize_skips_the_tail_of_a_frame_then_is_strict_again() {
    let out = GuestMessage::Output {
        id: "c".into(),
        stream: Stream::Stdout,
        // Output that itself looks like the start of a frame header.
        data: [&MAGIC[..], &[0, 1, 0, 0, 0, 3], b"tail of a frame"].concat(),
    };
    let list = GuestMessage::Processes { processes: vec![] };
    let frame = encode(&out).unwrap();
    let mut wire = frame[5..].to_vec();
    wire.extend(encode(&list).unwrap());
    wire.extend(encode(&out).unwrap());

    let mut strict = FrameDecoder::new();
    strict.push(&wire);
    assert!(strict.next_message::<GuestMessage>().is_err());

    let mut dec = FrameDecoder::new();
    dec.resynchronize();
    // Byte by byte, as a slow stream would deliver it.
    let mut got = Vec::new();
    for b in &wire {
        dec.push(std::slice::from_ref(b));
        while let Some(m) = dec.next_message::<GuestMessage>().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, [list, out]);
    dec.push(b"garbage!");
    assert!(matches!(
        dec.next_message::<GuestMessage>(),
        Err(ProtoError::BadMagic(_))
    ));
}

/// Variants are encoded by position: the clone-identity messages were added
/// at the end, so peers built before them still decode everything else.
#[test]
fn identity_messages_keep_older_variant_numbers() {
    let payload = |frame: Vec<u8>| frame[HEADER_LEN..].to_vec();
    let identity = HostMessage::Identity(CloneIdentity {
        hostname: "h".into(),
        unix_time_ns: 1,
        entropy: vec![],
    });
    assert_eq!(payload(encode(&identity).unwrap())[0], 9);
    assert_eq!(payload(encode(&HostMessage::ListProcesses).unwrap())[0], 8);
    let set = GuestMessage::IdentitySet {
        errors: vec!["x".into()],
    };
    assert_eq!(payload(encode(&set).unwrap())[0], 7);
    let processes = GuestMessage::Processes { processes: vec![] };
    assert_eq!(payload(encode(&processes).unwrap())[0], 6);
    let mut dec = FrameDecoder::new();
    dec.push(&encode(&set).unwrap());
    assert_eq!(dec.next_message::<GuestMessage>().unwrap(), Some(set));
}

#[test]
fn network_messages_round_trip_and_come_last() {
    let payload = |frame: Vec<u8>| frame[HEADER_LEN..].to_vec();
    let configure = HostMessage::ConfigureNetwork(network());
    assert_eq!(payload(encode(&configure).unwrap())[0], 11);
    let done = GuestMessage::NetworkConfigured {
        error: None,
        warnings: vec!["dropped nameserver 127.0.0.53".into()],
    };
    assert_eq!(payload(encode(&done).unwrap())[0], 9);
    let mut dec = FrameDecoder::new();
    dec.push(&encode(&configure).unwrap());
    dec.push(&encode(&done).unwrap());
    assert_eq!(dec.next_message::<HostMessage>().unwrap(), Some(configure));
    assert_eq!(dec.next_message::<GuestMessage>().unwrap(), Some(done));
}

#[test]
fn shared_mount_answers_round_trip() {
    let msgs = vec![
        GuestMessage::SharedMounted { error: None },
        GuestMessage::SharedMounted {
            error: Some("disk with serial \"pvl9\" not found in /sys/block after 5000 ms".into()),
        },
    ];
    let mut dec = FrameDecoder::new();
    for m in &msgs {
        dec.push(&encode(m).unwrap());
    }
    let mut got = Vec::new();
    while let Some(m) = dec.next_message::<GuestMessage>().unwrap() {
        got.push(m);
    }
    assert_eq!(got, msgs);
}

/// A peer built before mounts were data (protocol 1), or before volumes
/// (protocol 2), would misread a container spec or the volume messages:
/// its frames are refused by version, not half-decoded.
#[test]
fn older_protocol_peers_are_refused() {
    for old in [1u16, 2, 3] {
        let mut frame = encode(&GuestMessage::SharedMounted { error: None }).unwrap();
        frame[2..4].copy_from_slice(&old.to_be_bytes());
        let mut dec = FrameDecoder::new();
        dec.push(&frame);
        assert_eq!(
            dec.next_message::<GuestMessage>().unwrap_err(),
            ProtoError::Version { got: old, want: 4 }
        );
    }
}
