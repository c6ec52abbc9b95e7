# The KM appliance image: Debian 12 (bookworm) with the appliance's Debian package
# (packaging/build-deb.sh), installed by provision.sh.
#
# Three sources, all provisioned by the one build block below:
#   amazon-ebs.km     an AMI in your AWS account
#   googlecompute.km  a Compute Engine image in your Google Cloud project
#   null.km           no image: installs on an existing Debian 12 host over SSH
# Build one with `packer build -only=<source> packer/` at the repository root; README.md
# has the prerequisites and the commands.

locals {
  # 20260101120000: image names allow neither ':' nor upper case letters.
  timestamp  = regex_replace(timestamp(), "[- TZ:]", "")
  image_name = "km-appliance-${local.timestamp}"

  # Variable defaults cannot refer to path.root, so the empty defaults are resolved here.
  artifacts_dir   = var.artifacts_dir != "" ? var.artifacts_dir : "${path.root}/../target/deb"
  manifest_output = var.manifest_output != "" ? var.manifest_output : "${path.root}/packer-manifest.json"

  # The `version` of [workspace.package] in Cargo.toml (the whole file if it has none:
  # then "unknown"). file() takes a path relative to the template directory, abspath()
  # one relative to the working directory, as path.root is.
  cargo_version = regex_replace(file(abspath("${path.root}/../Cargo.toml")), "(?s)^.*?\\n\\[workspace\\.package\\]\\n[^\\[]*?\\bversion = \"([^\"]+)\".*$", "$1")
  version       = var.version != "" ? var.version : (length(local.cargo_version) <= 40 ? local.cargo_version : "unknown")
  commit        = var.commit != "" ? var.commit : "unknown"
  description   = "KM appliance ${local.version} (${local.commit}) on Debian 12"
  # What packaging/build-deb.sh names the package (the images are amd64).
  package = "km_${local.version}_amd64.deb"

  # Where the files go on the build machine before provision.sh installs them.
  staging = "/tmp/km-image"

  # Runs a shell provisioner's script as root, keeping its environment: directly when
  # the SSH user is root, otherwise through sudo (-n: fail instead of waiting for a
  # password no one can type).
  as_root = "chmod +x '{{ .Path }}'; if [ \"$(id -u)\" -eq 0 ]; then env {{ .Vars }} bash '{{ .Path }}'; else sudo -n -E env {{ .Vars }} bash '{{ .Path }}'; fi"

  aws_tags = merge({
    Name        = local.image_name
    Application = "km-appliance"
    Version     = local.version
    Commit      = local.commit
  }, var.aws_tags)

  # Compute Engine labels: lowercase letters, digits, '_' and '-', at most 63 characters.
  gcp_labels = merge({
    application = "km-appliance"
    version     = substr(regex_replace(lower(local.version), "[^a-z0-9_-]", "-"), 0, 63)
    commit      = substr(regex_replace(lower(local.commit), "[^a-z0-9_-]", "-"), 0, 63)
  }, var.gcp_labels)
}

source "amazon-ebs" "km" {
  region        = var.aws_region
  profile       = var.aws_profile
  instance_type = var.aws_instance_type
  vpc_id        = var.aws_vpc_id
  subnet_id     = var.aws_subnet_id

  temporary_security_group_source_cidrs = var.aws_ssh_cidrs

  # Debian's own Debian 12 AMIs (account 136693071363), the newest one.
  source_ami_filter {
    filters = {
      name                = "debian-12-amd64-*"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = ["136693071363"]
    most_recent = true
  }
  ssh_username = "admin"

  # The root volume; gp3 with its included baseline stated, as Packer 1.6 rejects a gp3
  # volume without iops and throughput.
  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = var.aws_volume_size
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    delete_on_termination = true
  }

  ami_name        = local.image_name
  ami_description = local.description
  ami_regions     = var.aws_ami_regions
  encrypt_boot    = var.aws_encrypt_boot
  kms_key_id      = var.aws_kms_key_id
  tags            = local.aws_tags
  snapshot_tags   = local.aws_tags
  run_tags        = merge(local.aws_tags, { Name = "packer build of ${local.image_name}" })
}

source "googlecompute" "km" {
  project_id   = var.gcp_project_id
  zone         = var.gcp_zone
  machine_type = var.gcp_machine_type
  network      = var.gcp_network
  subnetwork   = var.gcp_subnetwork

  # Debian's own Debian 12 images, the newest one of the family.
  source_image_family     = "debian-12"
  source_image_project_id = ["debian-cloud"]
  ssh_username            = "packer"
  use_os_login            = var.gcp_use_os_login
  disk_size               = var.gcp_disk_size

  image_name        = local.image_name
  image_family      = var.gcp_image_family
  image_description = local.description
  image_labels      = local.gcp_labels
  labels            = local.gcp_labels
}

source "null" "km" {
  ssh_host             = var.host_address
  ssh_port             = var.host_ssh_port
  ssh_username         = var.host_ssh_username
  ssh_private_key_file = var.host_ssh_private_key_file
  ssh_agent_auth       = var.host_ssh_private_key_file == ""
}

build {
  sources = [
    "source.amazon-ebs.km",
    "source.googlecompute.km",
    "source.null.km",
  ]

  # A fresh staging directory owned by the SSH user, who uploads the files below. What a
  # failed earlier run left on a null host goes first (as root: provision.sh may have
  # written there).
  provisioner "shell" {
    execute_command = local.as_root
    inline          = ["rm -rf ${local.staging}"]
  }
  provisioner "shell" {
    inline = ["mkdir -m 0700 ${local.staging}"]
  }

  # The package (checked to exist before anything is launched) and its installer.
  provisioner "file" {
    source      = "${local.artifacts_dir}/${local.package}"
    destination = "${local.staging}/"
  }
  provisioner "file" {
    source      = "${path.root}/provision.sh"
    destination = "${local.staging}/provision.sh"
  }

  # Installs the package from the staging directory, as root.
  # KM_IMAGE_BUILD is 0 on the null source: an existing host, not an image to generalise.
  provisioner "shell" {
    execute_command   = local.as_root
    expect_disconnect = false
    environment_vars = [
      "KM_VERSION=${local.version}",
      "KM_COMMIT=${local.commit}",
      "KM_IMAGE_BUILD=${source.type == "null" ? "0" : "1"}",
    ]
    inline = ["bash ${local.staging}/provision.sh ${local.staging}"]
  }

  provisioner "shell" {
    execute_command = local.as_root
    inline          = ["rm -rf ${local.staging}"]
  }

  # Image hygiene, images only: cloud-init runs again on the first boot of every
  # instance (new host keys, the instance's SSH key, hostname), and the build's
  # temporary SSH key leaves the build user.
  provisioner "shell" {
    except          = ["null.km"]
    execute_command = local.as_root
    inline = [
      "if command -v cloud-init >/dev/null 2>&1; then cloud-init clean --logs; fi",
    ]
  }
  provisioner "shell" {
    except = ["null.km"]
    inline = ["rm -f \"$HOME/.ssh/authorized_keys\""]
  }

  post-processor "manifest" {
    output     = local.manifest_output
    strip_path = true
    custom_data = {
      version    = local.version
      commit     = local.commit
      image_name = local.image_name
    }
  }
}
