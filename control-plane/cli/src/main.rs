//! fsm: the command line of the mesh, with FSM's commands, flags and messages.

mod chart;
mod config_diff;
mod errinfo;
mod install;
mod namespace;
mod proxy;
mod table;
mod translate;
mod uninstall;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;

/// The FSM-compatible service mesh's command line.
#[derive(Debug, Parser)]
#[command(name = "fsm", version, propagate_version = true)]
struct Cli {
    /// kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CLI's version and, when a mesh is reachable, its control plane's.
    #[command(after_help = "Example:\n  fsm version --fsm-namespace fsm-system")]
    Version {
        /// Namespace of the mesh's control plane.
        #[arg(long, default_value = "fsm-system")]
        fsm_namespace: String,
        /// Only the CLI's version (no cluster needed).
        #[arg(long)]
        client_only: bool,
    },
    /// Install the mesh's control plane: the embedded chart (charts/fsm) rendered as Helm
    /// renders it, CRDs first, then the controller, injector, webhooks, RBAC and MeshConfig;
    /// waits until the control plane is ready. One mesh per cluster.
    #[command(
        after_help = "Examples:\n  fsm install\n  fsm install --mesh-name fsm --fsm-namespace fsm-system --set fsm.sidecarClass=fsm-sidecar,fsm.enablePermissiveTrafficPolicy=true --timeout 900s\n  fsm install --dry-run > fsm.yaml"
    )]
    Install {
        #[command(flatten)]
        mesh: MeshArgs,
        /// Chart values, key=value[,key=value] (Helm's --set syntax; repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// A values YAML file (repeatable; --set wins over files).
        #[arg(short = 'f', long = "values", value_name = "FILE")]
        values: Vec<PathBuf>,
        /// How long to wait for the control plane to be ready (Go durations: 900s, 5m, 1h).
        #[arg(long, default_value = "5m", value_parser = install::parse_timeout)]
        timeout: std::time::Duration,
        /// Print the objects (CRDs included) instead of installing them; needs no cluster.
        #[arg(long)]
        dry_run: bool,
    },
    /// Add, remove, list or ignore namespaces of a mesh.
    #[command(subcommand, visible_alias = "ns")]
    Namespace(NamespaceCommand),
    /// Turn Prometheus scraping of a namespace's pods on or off.
    #[command(subcommand)]
    Metrics(MetricsCommand),
    /// Look at the mesh's sidecars: what the controller sent them, what they hold.
    #[command(subcommand)]
    Proxy(ProxyCommand),
    /// Compute one proxy's configuration from a directory of manifests, with no cluster and no
    /// controller, through the code the controller runs; or list every problem (file, document,
    /// object, field, FSM code) and exit 1.
    #[command(
        after_help = "Examples:\n  fsm translate -f examples/demo --proxy demo/curl --data-plane fsm-sidecar -o yaml\n  fsm translate -f examples/demo --proxy demo/curl -o bootstrap > curl.pb && envoy --mode validate -c curl.pb\n  fsm translate -f examples/demo --proxy demo/curl -o json   # Envoy's resources as /config_dump prints them"
    )]
    Translate {
        /// The manifest directory (read recursively, as `fsm-controller --manifest-dir` does).
        #[arg(short = 'f', long = "file")]
        dir: PathBuf,
        /// The proxy's pod, <namespace>/<pod> (optional when one pod has a sidecar).
        #[arg(long)]
        proxy: Option<String>,
        #[arg(long, value_enum, default_value = "envoy")]
        data_plane: translate::DataPlane,
        /// json or yaml (the proxy's resources; Envoy's as its /config_dump prints them),
        /// bootstrap (Envoy only: a static bootstrap, binary protobuf).
        #[arg(short, long, value_enum, default_value = "bootstrap")]
        output: translate::Output,
        #[command(flatten)]
        mesh: MeshArgs,
    },
    /// Remove a mesh's control plane.
    #[command(subcommand)]
    Uninstall(UninstallCommand),
    /// Help for operators.
    #[command(subcommand)]
    Support(SupportCommand),
    /// Print a shell completion script.
    #[command(after_help = "Example:\n  source <(fsm completion bash)")]
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Flags that name a mesh.
#[derive(Debug, clap::Args)]
struct MeshArgs {
    /// Name of the mesh.
    #[arg(long, default_value = "fsm")]
    mesh_name: String,
    /// Namespace of the mesh's control plane.
    #[arg(long, default_value = "fsm-system")]
    fsm_namespace: String,
}

#[derive(Debug, Subcommand)]
enum NamespaceCommand {
    /// Put namespaces in the mesh: label flomesh.io/monitored-by and enable sidecar injection.
    #[command(
        after_help = "Examples:\n  fsm namespace add demo\n  fsm namespace add demo --mesh-name=fsm --disable-sidecar-injection"
    )]
    Add {
        #[arg(required = true)]
        namespaces: Vec<String>,
        #[command(flatten)]
        mesh: MeshArgs,
        /// Add the namespaces without injecting sidecars into their new pods.
        #[arg(long)]
        disable_sidecar_injection: bool,
    },
    /// Take namespaces out of the mesh (their existing sidecars stay until pods are re-created).
    #[command(after_help = "Example:\n  fsm namespace remove demo --mesh-name=fsm")]
    Remove {
        #[arg(required = true)]
        namespaces: Vec<String>,
        #[command(flatten)]
        mesh: MeshArgs,
    },
    /// List the namespaces of a mesh (every mesh without --mesh-name).
    #[command(after_help = "Example:\n  fsm namespace list --mesh-name=fsm")]
    List {
        /// Only this mesh's namespaces.
        #[arg(long)]
        mesh_name: Option<String>,
    },
    /// Keep namespaces out of every mesh: no sidecar is ever injected there.
    #[command(after_help = "Example:\n  fsm namespace ignore kube-system")]
    Ignore {
        #[arg(required = true)]
        namespaces: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum MetricsCommand {
    /// Let Prometheus scrape the sidecars of the namespaces' pods created from now on.
    #[command(after_help = "Example:\n  fsm metrics enable --namespace \"bookstore, bookbuyer\"")]
    Enable {
        /// Namespaces, comma-separated.
        #[arg(long)]
        namespace: String,
    },
    /// Stop scraping the namespaces' pods created from now on.
    #[command(after_help = "Example:\n  fsm metrics disable --namespace bookstore")]
    Disable {
        /// Namespaces, comma-separated.
        #[arg(long)]
        namespace: String,
    },
}

#[derive(Debug, Subcommand)]
enum ProxyCommand {
    /// Every proxy connected to the controller and, per resource type, whether it holds what
    /// the controller computed for it (SYNCED, STALE, NACK); with a pod, its versions, the last
    /// error it reported, and resource by resource what it holds (its own /config_dump) against
    /// what the controller computes for it now, with a diff of each difference.
    #[command(
        after_help = "Examples:\n  fsm proxy status\n  fsm proxy status curl-7c9f5f9cdf-x2x8z -n demo\n  fsm proxy status curl -n demo --controller-url http://127.0.0.1:9091 --proxy-admin-url http://127.0.10.10:15000"
    )]
    Status {
        /// A pod, for its proxy's details.
        pod: Option<String>,
        /// The pod's namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Namespace of the mesh's control plane.
        #[arg(long, default_value = "fsm-system")]
        fsm_namespace: String,
        /// Ask the controller at this URL instead of through the cluster (a controller without
        /// a cluster, such as `make demo`'s: http://127.0.0.1:9091).
        #[arg(long)]
        controller_url: Option<String>,
        /// Read the pod's sidecar admin (its /config_dump) at this URL instead of through a
        /// port-forward (a sidecar without a cluster, such as `make demo`'s curl:
        /// http://127.0.10.10:15000).
        #[arg(long, requires = "pod")]
        proxy_admin_url: Option<String>,
    },
    /// GET one of a sidecar's admin endpoints (Envoy or fsm-sidecar) through a port-forward.
    #[command(after_help = "Example:\n  fsm proxy get config_dump curl-7c9f5f9cdf-x2x8z -n demo")]
    Get {
        /// config_dump, stats, clusters, listeners or ready.
        #[arg(value_parser = ["config_dump", "stats", "clusters", "listeners", "ready"])]
        query: String,
        pod: String,
        /// The pod's namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
}

#[derive(Debug, Subcommand)]
enum UninstallCommand {
    /// Remove the mesh's controller, injector, webhooks, RBAC and MeshConfig. The CRDs, the
    /// namespace and the mesh's Secrets stay unless asked.
    #[command(
        after_help = "Examples:\n  fsm uninstall mesh --mesh-name fsm\n  fsm uninstall mesh -f --delete-namespace --delete-cluster-wide-resources"
    )]
    Mesh {
        #[command(flatten)]
        mesh: MeshArgs,
        /// Do not ask for confirmation.
        #[arg(short, long)]
        force: bool,
        /// Also delete the control plane's namespace.
        #[arg(long)]
        delete_namespace: bool,
        /// Also delete FSM's CRDs (and every object of those kinds), the mesh's root Secret and
        /// the sidecars' bootstrap Secrets.
        #[arg(long)]
        delete_cluster_wide_resources: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SupportCommand {
    /// Describe FSM's error codes (all of them, or one).
    #[command(after_help = "Examples:\n  fsm support error-info\n  fsm support error-info E5001")]
    ErrorInfo {
        /// An error code such as E5001.
        code: Option<String>,
    },
}

async fn client(cli: &Cli) -> Result<kube::Client> {
    let options = kube::config::KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        None => match kube::Config::from_kubeconfig(&options).await {
            Ok(config) => config,
            Err(_) => kube::Config::incluster().context(
                "no kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config) and not in a cluster",
            )?,
        },
    };
    Ok(kube::Client::try_from(config)?)
}

async fn run(cli: Cli) -> Result<Vec<u8>> {
    if let Command::Translate {
        dir,
        proxy,
        data_plane,
        output,
        mesh,
    } = &cli.command
    {
        let translated = translate::translate(
            dir,
            proxy.as_deref(),
            *data_plane,
            *output,
            fsm_catalog::CatalogSettings {
                mesh_name: mesh.mesh_name.clone(),
                fsm_namespace: mesh.fsm_namespace.clone(),
            },
        )?;
        for warning in &translated.warnings {
            eprintln!("Warning: {warning}");
        }
        return Ok(translated.output);
    }
    run_text(cli).await.map(String::into_bytes)
}

async fn run_text(cli: Cli) -> Result<String> {
    let namespaces = || async { anyhow::Ok(Api::<Namespace>::all(client(&cli).await?)) };
    Ok(match &cli.command {
        Command::Version {
            fsm_namespace,
            client_only,
        } => {
            let mut out = format!("CLI Version: {}\n", env!("CARGO_PKG_VERSION"));
            if !client_only {
                let control_plane = match client(&cli).await {
                    Ok(client) => proxy::controller_get::<serde_json::Value>(
                        &proxy::Controller::Cluster {
                            client,
                            namespace: fsm_namespace.clone(),
                        },
                        "/version",
                    )
                    .await
                    .map(|v| v["version"].as_str().unwrap_or("unknown").to_string())
                    .map_err(|e| format!("{e:#}")),
                    Err(e) => Err(format!("{e:#}")),
                };
                match control_plane {
                    Ok(version) => out.push_str(&format!(
                        "Control plane [{fsm_namespace}] version: {version}\n"
                    )),
                    Err(e) => out.push_str(&format!(
                        "Control plane [{fsm_namespace}]: unreachable ({e})\n"
                    )),
                }
            }
            out
        }
        Command::Install {
            mesh,
            sets,
            values,
            timeout,
            dry_run,
        } => {
            let values_files = values
                .iter()
                .map(|path| {
                    std::fs::read_to_string(path)
                        .map(|text| (path.display().to_string(), text))
                        .with_context(|| format!("reading values file {}", path.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            let install = install::Install {
                mesh_name: mesh.mesh_name.clone(),
                fsm_namespace: mesh.fsm_namespace.clone(),
                values_files,
                sets: sets.clone(),
                timeout: *timeout,
            };
            if *dry_run {
                install.dry_run()?
            } else {
                install.run(&client(&cli).await?).await?
            }
        }
        Command::Support(SupportCommand::ErrorInfo { code }) => {
            errinfo::error_info(code.as_deref()).map_err(anyhow::Error::msg)?
        }
        Command::Completion { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "fsm", &mut out);
            String::from_utf8(out)?
        }
        Command::Namespace(NamespaceCommand::Add {
            namespaces: names,
            mesh,
            disable_sidecar_injection,
        }) => {
            namespace::add(
                &namespaces().await?,
                names,
                &mesh.mesh_name,
                &mesh.fsm_namespace,
                *disable_sidecar_injection,
            )
            .await?
        }
        Command::Namespace(NamespaceCommand::Remove {
            namespaces: names,
            mesh,
        }) => namespace::remove(&namespaces().await?, names, &mesh.mesh_name).await?,
        Command::Namespace(NamespaceCommand::List { mesh_name }) => {
            namespace::list(&namespaces().await?, mesh_name.as_deref()).await?
        }
        Command::Namespace(NamespaceCommand::Ignore { namespaces: names }) => {
            namespace::ignore(&namespaces().await?, names).await?
        }
        Command::Proxy(ProxyCommand::Status {
            pod,
            namespace,
            fsm_namespace,
            controller_url,
            proxy_admin_url,
        }) => {
            let controller = match controller_url {
                Some(url) => proxy::Controller::Url(url.clone()),
                None => proxy::Controller::Cluster {
                    client: client(&cli).await?,
                    namespace: fsm_namespace.clone(),
                },
            };
            proxy::status(
                &controller,
                pod.as_deref().map(|p| (namespace.as_str(), p)),
                proxy_admin_url.as_deref(),
            )
            .await?
        }
        Command::Proxy(ProxyCommand::Get {
            query,
            pod,
            namespace,
        }) => proxy::get(&client(&cli).await?, namespace, pod, query).await?,
        Command::Metrics(MetricsCommand::Enable { namespace }) => {
            namespace::metrics(&namespaces().await?, namespace, true).await?
        }
        Command::Metrics(MetricsCommand::Disable { namespace }) => {
            namespace::metrics(&namespaces().await?, namespace, false).await?
        }
        Command::Uninstall(UninstallCommand::Mesh {
            mesh,
            force,
            delete_namespace,
            delete_cluster_wide_resources,
        }) => {
            if !force && !uninstall::confirm(&mesh.mesh_name, &mut std::io::stdin().lock())? {
                anyhow::bail!("Uninstall of mesh [{}] aborted", mesh.mesh_name);
            }
            uninstall::uninstall(
                &client(&cli).await?,
                &uninstall::Uninstall {
                    mesh_name: &mesh.mesh_name,
                    fsm_namespace: &mesh.fsm_namespace,
                    delete_namespace: *delete_namespace,
                    delete_cluster_wide_resources: *delete_cluster_wide_resources,
                },
            )
            .await?
        }
        Command::Translate { .. } => unreachable!("handled by run"),
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(out) => {
            let _ = std::io::stdout().write_all(&out);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command an operator can run has `--help` with at least one example.
    #[test]
    fn every_command_has_an_example() {
        fn leaves(command: &clap::Command, path: String, out: &mut Vec<(String, String)>) {
            let subcommands: Vec<&clap::Command> = command.get_subcommands().collect();
            if subcommands.is_empty() {
                let help = command
                    .get_after_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                out.push((path, help));
                return;
            }
            for sub in subcommands {
                leaves(sub, format!("{path} {}", sub.get_name()), out);
            }
        }
        let mut commands = Vec::new();
        leaves(&Cli::command(), "fsm".into(), &mut commands);
        assert!(commands.len() >= 14, "{commands:?}");
        for (path, help) in commands {
            assert!(
                help.contains("Example") && help.contains("fsm "),
                "`{path} --help` has no example"
            );
        }
    }
}
