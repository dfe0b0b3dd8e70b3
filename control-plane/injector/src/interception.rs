//! The `fsm-init` interception rules: FSM's iptables program, for `iptables-restore --noflush`,
//! with the exclusions and inclusions of the mesh (MeshConfig `spec.traffic`) and of the pod (its
//! `flomesh.io/*-list` annotations) merged in.
//!
//! Outbound TCP goes to the sidecar's port 15001 and inbound TCP to 15003, except:
//! - the sidecar's own connections (UID 1500) and those to 127.0.0.1;
//! - inbound to the sidecar's metrics and probe ports (15010, 15901-15904);
//! - traffic through an excluded network interface, either way;
//! - outbound to an excluded CIDR or port, inbound to an excluded port;
//! - with an inclusion list, outbound to any CIDR not in it.
//!
//! The rules are read when the pod is created (FSM's injector bakes them into the init
//! container): a change applies to pods created after it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use fsm_crds::config::v1alpha3::TrafficSpec;
use fsm_crds::parse_cidr;

/// The UID the sidecar runs as; its own connections are never redirected.
pub const PROXY_UID: u32 = 1500;

/// Inbound ports the sidecar serves itself (Prometheus metrics, health probes): never
/// redirected to its inbound listener.
const SIDECAR_INBOUND_PORTS: [u16; 5] = [15010, 15901, 15902, 15903, 15904];

/// iptables' `multiport` match takes at most 15 ports.
const MULTIPORT_MAX: usize = 15;

/// FSM's pod annotations, each a comma-separated list added to the MeshConfig's.
pub const OUTBOUND_IP_EXCLUSION_ANNOTATION: &str = "flomesh.io/outbound-ip-range-exclusion-list";
pub const OUTBOUND_IP_INCLUSION_ANNOTATION: &str = "flomesh.io/outbound-ip-range-inclusion-list";
pub const OUTBOUND_PORT_EXCLUSION_ANNOTATION: &str = "flomesh.io/outbound-port-exclusion-list";
pub const INBOUND_PORT_EXCLUSION_ANNOTATION: &str = "flomesh.io/inbound-port-exclusion-list";

/// A list a pod's annotation or the MeshConfig gives that cannot become rules.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InterceptionError {
    /// `metadata.annotations["flomesh.io/..."]` or `spec.traffic.<list>[i]`.
    pub field: String,
    pub message: String,
}

/// What one pod's interception excludes or includes. Lists keep the MeshConfig's entries first,
/// then the pod's, each once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interception {
    pub outbound_ip_exclusions: Vec<String>,
    pub outbound_ip_inclusions: Vec<String>,
    pub outbound_port_exclusions: Vec<u16>,
    pub inbound_port_exclusions: Vec<u16>,
    pub interface_exclusions: Vec<String>,
}

impl Interception {
    /// The mesh's lists (`spec.traffic` of the MeshConfig) with the pod's annotations added.
    /// Every bad entry is reported, naming where it came from.
    pub fn for_pod(
        traffic: &TrafficSpec,
        pod_annotations: &BTreeMap<String, String>,
    ) -> Result<Interception, Vec<InterceptionError>> {
        let mut errors = Vec::new();
        let mut cidrs = |mesh: &[String], mesh_field: &str, annotation: &str| {
            let mut list = Vec::new();
            for (i, cidr) in mesh.iter().enumerate() {
                match cidr_entry(cidr) {
                    Ok(c) => push_once(&mut list, c),
                    Err(message) => errors.push(InterceptionError {
                        field: format!("spec.traffic.{mesh_field}[{i}]"),
                        message,
                    }),
                }
            }
            for entry in annotation_entries(pod_annotations, annotation) {
                match cidr_entry(entry) {
                    Ok(c) => push_once(&mut list, c),
                    Err(message) => errors.push(annotation_error(annotation, message)),
                }
            }
            list
        };
        let outbound_ip_exclusions = cidrs(
            &traffic.outbound_ip_range_exclusion_list,
            "outboundIPRangeExclusionList",
            OUTBOUND_IP_EXCLUSION_ANNOTATION,
        );
        let outbound_ip_inclusions = cidrs(
            &traffic.outbound_ip_range_inclusion_list,
            "outboundIPRangeInclusionList",
            OUTBOUND_IP_INCLUSION_ANNOTATION,
        );
        let mut ports = |mesh: &[u16], mesh_field: &str, annotation: &str| {
            let mut list = Vec::new();
            for (i, port) in mesh.iter().enumerate() {
                if *port == 0 {
                    errors.push(InterceptionError {
                        field: format!("spec.traffic.{mesh_field}[{i}]"),
                        message: "port must be in 1..=65535".into(),
                    });
                } else {
                    push_once(&mut list, *port);
                }
            }
            for entry in annotation_entries(pod_annotations, annotation) {
                match entry.parse::<u16>() {
                    Ok(port) if port > 0 => push_once(&mut list, port),
                    _ => errors.push(annotation_error(
                        annotation,
                        format!("{entry:?} is not a port in 1..=65535"),
                    )),
                }
            }
            list
        };
        let outbound_port_exclusions = ports(
            &traffic.outbound_port_exclusion_list,
            "outboundPortExclusionList",
            OUTBOUND_PORT_EXCLUSION_ANNOTATION,
        );
        let inbound_port_exclusions = ports(
            &traffic.inbound_port_exclusion_list,
            "inboundPortExclusionList",
            INBOUND_PORT_EXCLUSION_ANNOTATION,
        );
        let mut interface_exclusions = Vec::new();
        for (i, name) in traffic.network_interface_exclusion_list.iter().enumerate() {
            if is_interface_name(name) {
                push_once(&mut interface_exclusions, name.clone());
            } else {
                errors.push(InterceptionError {
                    field: format!("spec.traffic.networkInterfaceExclusionList[{i}]"),
                    message: format!("{name:?} is not a network interface name (1-15 characters of letters, digits, '.', '-', '_')"),
                });
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Interception {
            outbound_ip_exclusions,
            outbound_ip_inclusions,
            outbound_port_exclusions,
            inbound_port_exclusions,
            interface_exclusions,
        })
    }

    /// The rules, for `iptables-restore --noflush` (IPv4 `nat` table): FSM's program, the
    /// exclusions inserted ahead of the redirects.
    pub fn iptables_restore(&self) -> String {
        let mut out = String::from("# FSM sidecar interception rules\n*nat\n");
        for chain in [
            "fsm_PROXY_INBOUND",
            "fsm_PROXY_IN_REDIRECT",
            "fsm_PROXY_OUTBOUND",
            "fsm_PROXY_OUT_REDIRECT",
        ] {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        // Inbound.
        out.push_str("-A fsm_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 15003\n");
        out.push_str("-A PREROUTING -p tcp -j fsm_PROXY_INBOUND\n");
        for port in SIDECAR_INBOUND_PORTS {
            let _ = writeln!(out, "-A fsm_PROXY_INBOUND -p tcp --dport {port} -j RETURN");
        }
        out.push_str("-A fsm_PROXY_INBOUND -p tcp -j fsm_PROXY_IN_REDIRECT\n");
        for interface in &self.interface_exclusions {
            let _ = writeln!(out, "-I fsm_PROXY_INBOUND -i {interface} -j RETURN");
        }
        for ports in self.inbound_port_exclusions.chunks(MULTIPORT_MAX) {
            let _ = writeln!(
                out,
                "-I fsm_PROXY_INBOUND -p tcp --match multiport --dports {} -j RETURN",
                join(ports)
            );
        }
        // Outbound.
        out.push_str("-A fsm_PROXY_OUT_REDIRECT -p tcp -j REDIRECT --to-port 15001\n");
        out.push_str("-A fsm_PROXY_OUT_REDIRECT -p tcp --dport 15000 -j ACCEPT\n");
        out.push_str("-A OUTPUT -p tcp -j fsm_PROXY_OUTBOUND\n");
        // The sidecar calling its own pod's address comes back in through its inbound port.
        let _ = writeln!(
            out,
            "-A fsm_PROXY_OUTBOUND -o lo ! -d 127.0.0.1/32 -m owner --uid-owner {PROXY_UID} -j fsm_PROXY_IN_REDIRECT"
        );
        let _ = writeln!(
            out,
            "-A fsm_PROXY_OUTBOUND -o lo -m owner ! --uid-owner {PROXY_UID} -j RETURN"
        );
        let _ = writeln!(
            out,
            "-A fsm_PROXY_OUTBOUND -m owner --uid-owner {PROXY_UID} -j RETURN"
        );
        out.push_str("-A fsm_PROXY_OUTBOUND -d 127.0.0.1/32 -j RETURN\n");
        for interface in &self.interface_exclusions {
            let _ = writeln!(out, "-A fsm_PROXY_OUTBOUND -o {interface} -j RETURN");
        }
        if self.outbound_ip_inclusions.is_empty() {
            out.push_str("-A fsm_PROXY_OUTBOUND -j fsm_PROXY_OUT_REDIRECT\n");
        } else {
            for cidr in &self.outbound_ip_inclusions {
                let _ = writeln!(
                    out,
                    "-A fsm_PROXY_OUTBOUND -d {cidr} -j fsm_PROXY_OUT_REDIRECT"
                );
            }
            // Anything else leaves without the sidecar.
            out.push_str("-A fsm_PROXY_OUTBOUND -j RETURN\n");
        }
        // Inserted at the top, ahead of every redirect above (exclusions win over inclusions).
        for cidr in &self.outbound_ip_exclusions {
            let _ = writeln!(out, "-I fsm_PROXY_OUTBOUND -d {cidr} -j RETURN");
        }
        for ports in self.outbound_port_exclusions.chunks(MULTIPORT_MAX) {
            let _ = writeln!(
                out,
                "-I fsm_PROXY_OUTBOUND -p tcp --match multiport --dports {} -j RETURN",
                join(ports)
            );
        }
        out.push_str("COMMIT\n");
        out
    }
}

fn push_once<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}

fn join(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A CIDR as iptables is given it: IPv4 only (these are IPv4 `nat` rules).
fn cidr_entry(cidr: &str) -> Result<String, String> {
    match parse_cidr(cidr) {
        Some((addr, _)) if addr.is_ipv4() => Ok(cidr.to_owned()),
        Some(_) => Err(format!(
            "{cidr:?} is an IPv6 range; the interception rules are IPv4 only"
        )),
        None => Err(format!("{cidr:?} is not a CIDR such as \"10.244.0.0/16\"")),
    }
}

/// The comma-separated entries of `annotation`, blanks skipped.
fn annotation_entries<'a>(
    annotations: &'a BTreeMap<String, String>,
    annotation: &str,
) -> impl Iterator<Item = &'a str> {
    annotations
        .get(annotation)
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
}

fn annotation_error(annotation: &str, message: String) -> InterceptionError {
    InterceptionError {
        field: format!("metadata.annotations[{annotation:?}]"),
        message,
    }
}

/// What Linux accepts as an interface name, and nothing a shell or iptables would read as more.
fn is_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FSM's current `fsm-init` program (spec/mesh-core.md §14.1), with the `net1`/`net2`
    /// interface exclusions its example has.
    const FSM_INIT: &str = "# FSM sidecar interception rules
*nat
:fsm_PROXY_INBOUND - [0:0]
:fsm_PROXY_IN_REDIRECT - [0:0]
:fsm_PROXY_OUTBOUND - [0:0]
:fsm_PROXY_OUT_REDIRECT - [0:0]
-A fsm_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 15003
-A PREROUTING -p tcp -j fsm_PROXY_INBOUND
-A fsm_PROXY_INBOUND -p tcp --dport 15010 -j RETURN
-A fsm_PROXY_INBOUND -p tcp --dport 15901 -j RETURN
-A fsm_PROXY_INBOUND -p tcp --dport 15902 -j RETURN
-A fsm_PROXY_INBOUND -p tcp --dport 15903 -j RETURN
-A fsm_PROXY_INBOUND -p tcp --dport 15904 -j RETURN
-A fsm_PROXY_INBOUND -p tcp -j fsm_PROXY_IN_REDIRECT
-I fsm_PROXY_INBOUND -i net1 -j RETURN
-I fsm_PROXY_INBOUND -i net2 -j RETURN
-A fsm_PROXY_OUT_REDIRECT -p tcp -j REDIRECT --to-port 15001
-A fsm_PROXY_OUT_REDIRECT -p tcp --dport 15000 -j ACCEPT
-A OUTPUT -p tcp -j fsm_PROXY_OUTBOUND
-A fsm_PROXY_OUTBOUND -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1500 -j fsm_PROXY_IN_REDIRECT
-A fsm_PROXY_OUTBOUND -o lo -m owner ! --uid-owner 1500 -j RETURN
-A fsm_PROXY_OUTBOUND -m owner --uid-owner 1500 -j RETURN
-A fsm_PROXY_OUTBOUND -d 127.0.0.1/32 -j RETURN
-A fsm_PROXY_OUTBOUND -o net1 -j RETURN
-A fsm_PROXY_OUTBOUND -o net2 -j RETURN
-A fsm_PROXY_OUTBOUND -j fsm_PROXY_OUT_REDIRECT
COMMIT
";

    fn traffic(edit: impl FnOnce(&mut TrafficSpec)) -> TrafficSpec {
        let mut traffic = TrafficSpec::default();
        edit(&mut traffic);
        traffic
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn fsms_program_is_reproduced_exactly() {
        let interception = Interception::for_pod(
            &traffic(|t| t.network_interface_exclusion_list = vec!["net1".into(), "net2".into()]),
            &BTreeMap::new(),
        )
        .expect("valid");
        assert_eq!(interception.iptables_restore(), FSM_INIT);
    }

    /// The mesh's and the pod's lists merge (FSM's example: global 6379,7070 and the pod's 8080
    /// give `--dports 6379,7070,8080`), each entry once.
    #[test]
    fn mesh_and_pod_lists_merge() {
        let interception = Interception::for_pod(
            &traffic(|t| {
                t.outbound_port_exclusion_list = vec![6379, 7070];
                t.outbound_ip_range_exclusion_list = vec!["1.1.1.1/32".into(), "2.2.2.2/24".into()];
                t.inbound_port_exclusion_list = vec![9090];
            }),
            &annotations(&[
                (OUTBOUND_PORT_EXCLUSION_ANNOTATION, "8080, 6379"),
                (OUTBOUND_IP_EXCLUSION_ANNOTATION, "10.244.0.0/16,1.1.1.1/32"),
                (INBOUND_PORT_EXCLUSION_ANNOTATION, "9091"),
            ]),
        )
        .expect("valid");
        assert_eq!(interception.outbound_port_exclusions, [6379, 7070, 8080]);
        let rules = interception.iptables_restore();
        for rule in [
            "-I fsm_PROXY_OUTBOUND -p tcp --match multiport --dports 6379,7070,8080 -j RETURN\n",
            "-I fsm_PROXY_OUTBOUND -d 1.1.1.1/32 -j RETURN\n",
            "-I fsm_PROXY_OUTBOUND -d 2.2.2.2/24 -j RETURN\n",
            "-I fsm_PROXY_OUTBOUND -d 10.244.0.0/16 -j RETURN\n",
            "-I fsm_PROXY_INBOUND -p tcp --match multiport --dports 9090,9091 -j RETURN\n",
        ] {
            assert!(rules.contains(rule), "{rule}missing from\n{rules}");
        }
        assert_eq!(rules.matches("-d 1.1.1.1/32").count(), 1);
        assert!(rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn an_inclusion_list_redirects_only_its_ranges() {
        let interception = Interception::for_pod(
            &traffic(|t| t.outbound_ip_range_inclusion_list = vec!["10.96.0.0/12".into()]),
            &annotations(&[(OUTBOUND_IP_INCLUSION_ANNOTATION, "10.244.0.0/16")]),
        )
        .expect("valid");
        let rules = interception.iptables_restore();
        assert!(rules.contains(
            "-A fsm_PROXY_OUTBOUND -d 10.96.0.0/12 -j fsm_PROXY_OUT_REDIRECT\n\
             -A fsm_PROXY_OUTBOUND -d 10.244.0.0/16 -j fsm_PROXY_OUT_REDIRECT\n\
             -A fsm_PROXY_OUTBOUND -j RETURN\n"
        ));
        assert!(!rules.contains("-A fsm_PROXY_OUTBOUND -j fsm_PROXY_OUT_REDIRECT\n"));
    }

    #[test]
    fn more_ports_than_one_multiport_match_takes_are_split() {
        let interception = Interception::for_pod(
            &traffic(|t| t.outbound_port_exclusion_list = (1..=20).collect()),
            &BTreeMap::new(),
        )
        .expect("valid");
        let rules = interception.iptables_restore();
        assert!(rules.contains("--dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j RETURN\n"));
        assert!(rules.contains("--dports 16,17,18,19,20 -j RETURN\n"));
    }

    /// A bad entry is named by where it came from; nothing a shell or iptables would read as
    /// more than one value gets through.
    #[test]
    fn bad_entries_are_reported_by_field() {
        let errors = Interception::for_pod(
            &traffic(|t| {
                t.outbound_ip_range_exclusion_list = vec!["10.0.0.0/33".into(), "fd00::/64".into()];
                t.network_interface_exclusion_list = vec!["eth0; rm -rf /".into()];
                t.inbound_port_exclusion_list = vec![0];
            }),
            &annotations(&[
                (OUTBOUND_PORT_EXCLUSION_ANNOTATION, "80,http"),
                (OUTBOUND_IP_INCLUSION_ANNOTATION, "10.0.0.1 -j ACCEPT"),
            ]),
        )
        .expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.traffic.outboundIPRangeExclusionList[0]",
                "spec.traffic.outboundIPRangeExclusionList[1]",
                "metadata.annotations[\"flomesh.io/outbound-ip-range-inclusion-list\"]",
                "metadata.annotations[\"flomesh.io/outbound-port-exclusion-list\"]",
                "spec.traffic.inboundPortExclusionList[0]",
                "spec.traffic.networkInterfaceExclusionList[0]",
            ]
        );
    }

    proptest::proptest! {
        /// Whatever the annotations hold, what reaches the rules is digits, dots and slashes
        /// only: no entry can add a rule or an option of its own.
        #[test]
        fn annotations_cannot_inject_rules(value in ".{0,40}") {
            let annotations = annotations(&[
                (OUTBOUND_IP_EXCLUSION_ANNOTATION, &value),
                (OUTBOUND_PORT_EXCLUSION_ANNOTATION, &value),
                (INBOUND_PORT_EXCLUSION_ANNOTATION, &value),
                (OUTBOUND_IP_INCLUSION_ANNOTATION, &value),
            ]);
            if let Ok(interception) = Interception::for_pod(&TrafficSpec::default(), &annotations) {
                let plain = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'/');
                for cidr in interception.outbound_ip_exclusions.iter().chain(&interception.outbound_ip_inclusions) {
                    proptest::prop_assert!(plain(cidr), "{cidr:?}");
                }
                let rules = interception.iptables_restore();
                proptest::prop_assert_eq!(rules.matches("COMMIT").count(), 1);
            }
        }
    }
}
