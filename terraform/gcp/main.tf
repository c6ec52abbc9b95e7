# One KM appliance on Compute Engine: the Packer-built image, firewall rules admitting
# HTTP and HTTPS from anywhere and SSH only from var.ssh_cidrs, a static external address
# that is the machine's from its first boot on, and a startup script (run by the guest
# agent at every boot, doing nothing once the appliance is set up) that applies the
# settings headless when a licence is given.

data "google_compute_image" "km" {
  count = var.image == null ? 1 : 0

  project = var.project
  family  = var.image_family
}

locals {
  image  = var.image != null ? var.image : data.google_compute_image.km[0].self_link
  region = join("-", slice(split("-", var.zone), 0, 2))

  # The tag the firewall rules target.
  network_tag = "${var.name}-appliance"

  # The whole internet, as one firewall rule takes it: one address family each.
  world = {
    ipv4 = "0.0.0.0/0"
    ipv6 = "::/0"
  }

  # The SSH ranges by address family ("ipv4", "ipv6"), only the families listed.
  ssh_ranges = { for c in var.ssh_cidrs : (strcontains(c, ":") ? "ipv6" : "ipv4") => c... }

  # The appliance's settings file: names as km-wizard reads them. Unset (null or empty)
  # values are left out by the template; the WIZARD_* ones create the first admin and are
  # not written to /etc/km/km.env.
  settings = merge(var.extra_settings, {
    KM_DEDICATED_KEY      = var.licence
    KM_SITE_URL           = var.site_url
    KM_MONGO_URL          = var.mongo_url
    KM_ELASTICSEARCH_URL  = var.elasticsearch_url
    KM_REDIS_URL          = var.redis_url
    SMTP_HOST             = var.smtp_host
    SMTP_PORT             = var.smtp_port == null ? null : tostring(var.smtp_port)
    SMTP_USER             = var.smtp_user
    SMTP_PASSWORD         = var.smtp_password
    SMTP_SENDER           = var.smtp_sender
    SMTP_TLS              = var.smtp_tls
    KM_TLS                = var.km_tls
    KM_ACME_EMAIL         = var.acme_email
    KM_RETENTION_DAYS     = var.retention_days == null ? null : tostring(var.retention_days)
    WIZARD_ADMIN_USERNAME = var.admin_username
    WIZARD_ADMIN_EMAIL    = var.admin_email
    WIZARD_ADMIN_PASSWORD = var.admin_password
  })

  headless = var.licence != null && var.licence != ""

  # The first-boot script, as the startup-script metadata key: Debian's Google Cloud
  # image has no cloud-init, and its guest agent runs that key at every boot (the script
  # does nothing once the settings were applied). Instance metadata is not secret:
  # anyone allowed compute.instances.get in the project, and any process on the instance
  # (through the metadata server), can read the key, secrets included. It also stays in
  # the Terraform state. The README says how to rotate what it carries and remove the
  # key after the first boot.
  startup_script = templatefile("${path.module}/../shared/first-boot.sh.tftpl", {
    headless = local.headless
    settings = local.settings
  })
}

# Reserved before the instance, so that the machine has it from the first boot on (DNS
# for site_url and the ACME HTTP-01 validation point at it) and keeps it across stops.
resource "google_compute_address" "km" {
  project      = var.project
  region       = local.region
  name         = var.name
  description  = "KM appliance ${var.name}"
  address_type = "EXTERNAL"
  network_tier = "PREMIUM"
  labels       = var.labels
}

resource "google_compute_firewall" "http" {
  # checkov:skip=CKV_GCP_106:The appliance is a public web service: port 80 answers the ACME HTTP-01 challenges and redirects browsers and agents to HTTPS
  for_each = local.world

  project       = var.project
  name          = "${var.name}-http-${each.key}"
  description   = "KM appliance ${var.name}: HTTP from anywhere (ACME HTTP-01 challenges, redirect to HTTPS)"
  network       = var.network
  direction     = "INGRESS"
  source_ranges = [each.value]
  target_tags   = [local.network_tag]

  allow {
    protocol = "tcp"
    ports    = ["80"]
  }
}

resource "google_compute_firewall" "https" {
  for_each = local.world

  project       = var.project
  name          = "${var.name}-https-${each.key}"
  description   = "KM appliance ${var.name}: HTTPS from anywhere (dashboard, API and PM2 agents)"
  network       = var.network
  direction     = "INGRESS"
  source_ranges = [each.value]
  target_tags   = [local.network_tag]

  allow {
    protocol = "tcp"
    ports    = ["443"]
  }
}

# SSH only from the listed ranges (none by default: no rule). Outbound traffic needs no
# rule: a VPC network allows all egress unless a rule denies it.
resource "google_compute_firewall" "ssh" {
  for_each = local.ssh_ranges

  project       = var.project
  name          = "${var.name}-ssh-${each.key}"
  description   = "KM appliance ${var.name}: SSH from the administrators' ranges (ssh_cidrs)"
  network       = var.network
  direction     = "INGRESS"
  source_ranges = each.value
  target_tags   = [local.network_tag]

  allow {
    protocol = "tcp"
    ports    = ["22"]
  }
}

resource "google_compute_instance" "km" {
  # checkov:skip=CKV_GCP_40:The appliance is a public web service reached directly on its external address (no load balancer in front)
  # checkov:skip=CKV_GCP_30:The default compute account is used only when service_account_email is null, and then limited to the logging and monitoring write scopes (CKV_GCP_31 passes); the appliance calls no Google API
  # checkov:skip=CKV_GCP_38:Customer-supplied keys would have to be given at every start, which an unattended appliance cannot do; the disk is encrypted by Google, or by a Cloud KMS key through boot_disk_kms_key_self_link
  project                   = var.project
  zone                      = var.zone
  name                      = var.name
  machine_type              = var.machine_type
  tags                      = concat([local.network_tag], var.network_tags)
  labels                    = var.labels
  can_ip_forward            = false
  deletion_protection       = var.deletion_protection
  allow_stopping_for_update = true

  boot_disk {
    auto_delete       = true
    kms_key_self_link = var.boot_disk_kms_key_self_link

    initialize_params {
      image  = local.image
      size   = var.boot_disk_size_gb
      type   = var.boot_disk_type
      labels = var.labels
    }
  }

  network_interface {
    network    = var.network
    subnetwork = var.subnetwork
    stack_type = var.ipv6 ? "IPV4_IPV6" : "IPV4_ONLY"

    access_config {
      nat_ip       = google_compute_address.km.address
      network_tier = "PREMIUM"
    }

    dynamic "ipv6_access_config" {
      for_each = var.ipv6 ? [1] : []
      content {
        network_tier = "PREMIUM"
      }
    }
  }

  metadata = {
    startup-script         = local.startup_script
    block-project-ssh-keys = "true"
    enable-oslogin         = var.enable_oslogin ? "TRUE" : "FALSE"
    serial-port-enable     = var.serial_port_enable ? "TRUE" : "FALSE"
  }

  service_account {
    email  = var.service_account_email
    scopes = var.service_account_scopes
  }

  shielded_instance_config {
    enable_secure_boot          = var.secure_boot
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  lifecycle {
    # The settings are applied once, at first boot; later changes go through the
    # dashboard or `km-wizard reopen`. A newer image is taken only when the instance is
    # replaced on purpose (terraform apply -replace): replacing it would lose the
    # embedded datastores on its boot disk.
    ignore_changes = [metadata["startup-script"], boot_disk[0].initialize_params[0].image]

    precondition {
      condition     = alltrue([for v in values(local.settings) : try(length(regexall("[\\r\\n\\x00]", v)), 0) == 0])
      error_message = "The appliance's settings cannot contain line breaks or NUL characters."
    }

    precondition {
      condition     = local.headless ? (var.admin_username != null && var.admin_email != null && var.admin_password != null) : true
      error_message = "A headless setup (licence set) needs admin_username, admin_email and admin_password: without a first admin, whoever signs up first on the public address would become admin."
    }

    precondition {
      condition     = var.km_tls != "acme" || startswith(coalesce(var.site_url, "-"), "https://")
      error_message = "km_tls = \"acme\" needs an https:// site_url: the certificate is issued for its host."
    }
  }
}
