fn main() {
    println!("ferrotap");
}
