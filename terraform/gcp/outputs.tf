output "public_ip" {
  description = "The appliance's static external IPv4 address: point site_url's DNS name at it."
  value       = google_compute_address.km.address
}

output "public_ipv6" {
  description = "The appliance's external IPv6 address, when ipv6 is true (else null)."
  value       = try(google_compute_instance.km.network_interface[0].ipv6_access_config[0].external_ipv6, null)
}

output "site_url" {
  description = "Where the appliance answers: site_url when set, else http://<public_ip>."
  value       = var.site_url != null ? var.site_url : "http://${google_compute_address.km.address}"
}

output "setup" {
  description = "\"headless\" when a licence was given (the settings are applied at first boot), else \"wizard\": open the setup URL printed on the serial console (gcloud compute instances get-serial-port-output) and in `journalctl -u km-wizard`."
  # Whether a licence was given is not itself secret.
  value = nonsensitive(local.headless) ? "headless" : "wizard"
}

output "instance_id" {
  description = "Server-assigned ID of the Compute Engine instance."
  value       = google_compute_instance.km.instance_id
}

output "instance_self_link" {
  description = "Self link of the instance."
  value       = google_compute_instance.km.self_link
}

output "image" {
  description = "The image the boot disk was created from."
  value       = google_compute_instance.km.boot_disk[0].initialize_params[0].image
}

output "firewall_target_tag" {
  description = "Network tag the module's firewall rules target (give it to other instances only if they should be as open)."
  value       = local.network_tag
}

output "startup_script" {
  description = "The startup-script metadata value rendered from the current inputs, secrets included: the first-boot shell script (run by the guest agent at every boot, doing nothing once the settings were applied) a new instance boots with (`terraform output -raw startup_script`)."
  value       = local.startup_script
  sensitive   = true
}
